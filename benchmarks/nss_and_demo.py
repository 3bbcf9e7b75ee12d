"""Prints the NSS feature time per 512x384 image and the time to build the full demo set.

Run: python benchmarks/nss_and_demo.py
"""

import tempfile
import time
from pathlib import Path

from iqa.data.demo import load_photo, make_demo
from iqa.extract.nss import nss_features

image = load_photo("coffee", short_side=384)[0].resize((512, 384))
nss_features(image)
repeats = 20
start = time.perf_counter()
for _ in range(repeats):
    nss_features(image)
print(f"nss_features, 512x384: {(time.perf_counter() - start) / repeats * 1000:.1f} ms per image")

with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    labels = make_demo(Path(tmp) / "demo-src")
    seconds = time.perf_counter() - start
    n_images = sum(1 for _ in open(labels)) - 1
    size_mb = sum(p.stat().st_size for p in labels.parent.rglob("*")) / 2**20
    print(f"make_demo: {n_images} images, {size_mb:.0f} MiB, built in {seconds:.1f} s")
