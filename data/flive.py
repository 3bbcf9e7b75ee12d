"""FLIVE (PaQ-2-PiQ): 39,810 pictures; `labels_image.csv` (`name,mos`, MOS 0-100).

Names carry their source sub-folder (`voc_emotic_ava/...`, `blur_dataset/...`, `EE371R/...`),
so the image folder is the one holding those sub-folders: `database/` when the root has one,
else the root itself. Target = MOS / 100.
"""

from iqa.data.table_release import TableRelease

RELEASE_COUNT = 39_810
load = TableRelease(
    dataset="flive",
    labels="labels_image.csv",
    name_column="name",
    score_column="mos",
    score_range=(0, 100),
    scale="MOS 0-100",
    image_folders=("database", "."),
).load
