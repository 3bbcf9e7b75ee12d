"""AGIQA-1K: AI-generated images; `AIGC_MOS_Zscore.xlsx` (`Image,Prompt,MOS`, MOS 0-5).

The images ship as `file.zip`, which unpacks to `file/` (some setups rename it `images/`).
Target = MOS / 5; the prompt is kept as an extra column.

The released file has 1,080 rows but 1,079 images: its last row repeats
`dreamStudio_8_9_1_1.jpg` (same prompt, another MOS) and `dreamStudio_8_5_0_0.jpg` has no row.
`prepare` keeps the first row of that name and warns; any other duplicate is still an error.
"""

from iqa.data.table_release import TableRelease

RELEASE_COUNT = 1_080
KNOWN_DUPLICATES = frozenset({"dreamStudio_8_9_1_1.jpg"})
load = TableRelease(
    dataset="agiqa1k",
    labels="AIGC_MOS_Zscore.xlsx",
    name_column="Image",
    score_column="MOS",
    score_range=(0, 5),
    scale="MOS 0-5",
    image_folders=("file", "images", "."),
    text_extras=("Prompt",),
).load
