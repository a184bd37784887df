"""Takes docs/serve_page.png: the `--mode serve` page on a trained run, in headless Chromium.

    python launch.py --config configs/demo.py --workdir runs/demo      # once (~2 min)
    python docs/screenshot_serve.py --workdir runs/demo

Needs the serve extra, Selenium, and Debian's chromium + chromium-driver (what
the browser test uses). The page searches with a random test-split image
(seeded), so the results carry right / wrong marks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--out", default=os.path.join(REPO, "docs", "serve_page.png"))
  p.add_argument("--seed", type=int, default=3)
  args = p.parse_args(argv)

  from selenium import webdriver
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  from fgir_jax.commands import serve
  from fgir_jax.commands.service import SearchService

  spec = importlib.util.spec_from_file_location("run_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  service = SearchService(module.get_config(), args.workdir)
  serve.warm_up(service)
  random.seed(args.seed)  # the random test image the page asks for
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,860",
              "--hide-scrollbars"):
    options.add_argument(arg)
  with serve.Background(service) as server:
    browser = webdriver.Chrome(options=options,
                               service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
      browser.get(server.url + "/")
      wait = WebDriverWait(browser, 60)
      wait.until(lambda b: "database images" in b.find_element(By.ID, "info").text)
      browser.find_element(By.ID, "random").click()
      wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR,
                                               ".result.right, .result.wrong")) >= 10)
      thumbs = browser.find_elements(By.CSS_SELECTOR, ".result img")
      wait.until(lambda b: all(t.get_property("naturalWidth") > 0 for t in thumbs))
      time.sleep(0.5)
      browser.save_screenshot(args.out)
    finally:
      browser.quit()
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
