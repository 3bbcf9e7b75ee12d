"""KADID-10k: 81 reference images x 25 distortions x 5 levels = 10,125 images in `images/`.

`dmos.csv` (`dist_img,ref_img,dmos,var`): despite its name `dmos` is a MOS on 1-5, higher is
better; target = (y-1)/4. `ref_img` is the content group, so `--split-by group` keeps every
distortion of one reference image on the same side.
"""

from iqa.data.table_release import TableRelease

RELEASE_COUNT = 10_125
load = TableRelease(
    dataset="kadid10k",
    labels="dmos.csv",
    name_column="dist_img",
    score_column="dmos",
    score_range=(1, 5),
    scale="MOS 1-5",
    image_folders=("images",),
    group_column="ref_img",
    number_extras=("var",),
).load
