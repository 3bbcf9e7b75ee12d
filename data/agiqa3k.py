"""AGIQA-3K: 2,982 AI-generated images; `data.csv`
(`name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align`, MOS 0-5).

The quality (perception) MOS is the target, / 5. The alignment MOS and both deviations are
kept as extra columns, as are the prompt and its parts; `agiqa3k-align` (data/agiqa3k_align.py)
targets the alignment MOS instead. The images ship as `file.zip`
(unpacked to `file/`; some setups rename it `images/` or `image/`).
"""

from iqa.data.table_release import TableRelease

RELEASE_COUNT = 2_982
RELEASE = TableRelease(
    dataset="agiqa3k",
    labels="data.csv",
    name_column="name",
    score_column="mos_quality",
    score_range=(0, 5),
    scale="quality MOS 0-5",
    image_folders=("file", "images", "image", "."),
    number_extras=("std_quality", "mos_align", "std_align"),
    text_extras=("prompt", "adj1", "adj2", "style"),
)
load = RELEASE.load
