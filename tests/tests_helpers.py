"""Constants shared by the browser-based tests."""

import os

#: Debian's chromium (``VITFT_CHROMIUM`` overrides).
CHROMIUM = os.environ.get("VITFT_CHROMIUM", "/usr/bin/chromium")
#: How chromium is started in tests (root, no sandbox, no network chatter).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
