"""SPAQ: 11,125 smartphone photos in `TestImage/`.

`Annotations/MOS and Image attribute scores.xlsx` has `Image name`, `MOS` (0-100) and five
attribute scores (Brightness, Colorfulness, Contrast, Noisiness, Sharpness), kept as extra
columns. Target = MOS / 100.
"""

from iqa.data.table_release import TableRelease

RELEASE_COUNT = 11_125
load = TableRelease(
    dataset="spaq",
    labels="Annotations/MOS and Image attribute scores.xlsx",
    name_column="Image name",
    score_column="MOS",
    score_range=(0, 100),
    scale="MOS 0-100",
    image_folders=("TestImage",),
    number_extras=("Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"),
).load
