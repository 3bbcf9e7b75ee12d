"""AGIQA-3K with the alignment MOS (how well the image matches its prompt, 0-5) as the target, / 5:
the optional target the recipe names for AGIQA-3K (docs/recipe.md). Same release, images and extra columns as `agiqa3k`
(the quality MOS kept as an extra); prepared under its own name, so its runs never mix with quality's.
"""

from dataclasses import replace

from iqa.data import agiqa3k

RELEASE_COUNT = agiqa3k.RELEASE_COUNT
load = replace(agiqa3k.RELEASE, dataset="agiqa3k-align", score_column="mos_align", scale="alignment MOS 0-5",
               number_extras=("std_align", "mos_quality", "std_quality")).load
