"""Runs the README's first Python example (the library use) where it is executed from."""

import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
exec(compile(block, "README.md (library example)", "exec"), {"__name__": "__main__"})
print("README library example: ran")
