"""A report page as a browser shows it: headless Chromium (Debian's chromium-headless-shell, which .ci/run
installs) loads the page and reports which images failed to load; local links are checked on disk; a
screenshot is kept under <repo>/.screenshots/. Tests that need the browser skip only where none is installed."""

import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
SCREENSHOTS = Path(__file__).resolve().parent.parent / ".screenshots"

PROBE = """<html><body><iframe id="page" src="{page}" width="1400" height="900"></iframe><script>
document.getElementById("page").onload = function () {{
  var broken = [], images = this.contentDocument.images;
  for (var img of images) if (!img.complete || img.naturalWidth === 0) broken.push(img.getAttribute("src"));
  document.title = JSON.stringify({{images: images.length, broken: broken}});
}};
</script></body></html>"""


def browser() -> str:
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip("no headless Chromium here (apt-get install chromium-headless-shell)")
    return found


def _run(args: list[str]) -> str:
    return subprocess.run([browser(), "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", *args],
                          capture_output=True, text=True, timeout=120).stdout


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("href", "src"):
            if attrs.get(name):
                self.links.append(attrs[name])


def missing_links(page: Path) -> list[str]:
    """Local href/src targets of the page that are not on disk."""
    parser = _Links()
    parser.feed(page.read_text())
    local = [link for link in parser.links if not urlparse(link).scheme and not link.startswith("#")]
    return [link for link in local if not (page.parent / unquote(link.split("#")[0])).exists()]


def loaded_images(page: Path) -> dict:
    """{"images": how many the page shows, "broken": the src of each one the browser could not load}."""
    with tempfile.TemporaryDirectory(dir=page.parent) as probe_dir:  # beside the page: same file origin
        probe = Path(probe_dir) / "probe.html"
        probe.write_text(PROBE.format(page=f"../{page.name}"))
        dom = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()])
    title = re.search(r"<title>(.*)</title>", dom, re.S)
    assert title, f"the browser did not load {page}"
    return json.loads(title.group(1).replace("&quot;", '"'))


def screenshot(page: Path, name: str, height: int = 2400) -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / f"{name}.png"
    _run([f"--screenshot={shot}", f"--window-size=1400,{height}", "--hide-scrollbars", page.as_uri()])
    assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of {page}"
    return shot


def check_page(page: Path, name: str) -> dict:
    """The page's links resolve, every image loads in the browser; a screenshot is kept. Returns the counts."""
    assert missing_links(page) == [], f"{page.name} links to files that are not there"
    loaded = loaded_images(page)
    assert loaded["broken"] == [], f"{page.name}: images the browser could not load: {loaded['broken']}"
    screenshot(page, name)
    return loaded
