"""The one table of dataset adapters: adding a dataset is adding one row here.

An adapter tells `prepare` how to read one dataset: `load(root, images=None, **options) -> Manifest`
reads the label files under `root` exactly as released; `release_count` is the number of images the
release has (None when there is none to compare with); `known_duplicates` are names the release
repeats by mistake (`prepare` keeps their first row and warns).

Most benchmarks are released as one label table, so their adapter is a `TableRelease` row below
(data/table_release.py reads it). The others keep a module of their own: KonIQ-10k (two label files,
data/koniq10k.py), CLIVE (MATLAB files, data/clive.py) and any other CSV (data/custom_csv.py).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

from iqa.cache.manifest import Manifest
from iqa.data import clive, custom_csv, koniq10k
from iqa.data.table_release import TableRelease


@dataclass(frozen=True)
class Adapter:
    load: Callable[..., Manifest]
    release_count: int | None
    known_duplicates: frozenset[str] = frozenset()


# KADID-10k: 81 reference images x 25 distortions x 5 levels = 10,125 images in `images/`.
# `dmos.csv` (`dist_img,ref_img,dmos,var`): despite its name `dmos` is a MOS on 1-5, higher is better;
# target = (y-1)/4. `ref_img` is the content group, so `--split-by group` keeps every distortion of one
# reference image on the same side.
KADID10K = TableRelease(dataset="kadid10k", labels="dmos.csv", name_column="dist_img", score_column="dmos",
                        score_range=(1, 5), scale="MOS 1-5", image_folders=("images",), group_column="ref_img",
                        number_extras=("var",))

# FLIVE (PaQ-2-PiQ): 39,810 pictures; `labels_image.csv` (`name,mos`, MOS 0-100), target = MOS / 100.
# Names carry their source sub-folder (`voc_emotic_ava/...`, `blur_dataset/...`, `EE371R/...`), so the
# image folder is the one holding those sub-folders: `database/` when the root has one, else the root.
FLIVE = TableRelease(dataset="flive", labels="labels_image.csv", name_column="name", score_column="mos",
                     score_range=(0, 100), scale="MOS 0-100", image_folders=("database", "."))

# SPAQ: 11,125 smartphone photos in `TestImage/`. `Annotations/MOS and Image attribute scores.xlsx` has
# `Image name`, `MOS` (0-100, target = MOS / 100) and five attribute scores, kept as extra columns.
SPAQ = TableRelease(dataset="spaq", labels="Annotations/MOS and Image attribute scores.xlsx",
                    name_column="Image name", score_column="MOS", score_range=(0, 100), scale="MOS 0-100",
                    image_folders=("TestImage",),
                    number_extras=("Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"))

# AGIQA-1K: AI-generated images; `AIGC_MOS_Zscore.xlsx` (`Image,Prompt,MOS`, MOS 0-5), target = MOS / 5,
# the prompt kept as an extra column. The images ship as `file.zip`, which unpacks to `file/` (some
# setups rename it `images/`). The released file has 1,080 rows but 1,079 images: its last row repeats
# `dreamStudio_8_9_1_1.jpg` (same prompt, another MOS) and `dreamStudio_8_5_0_0.jpg` has no row.
AGIQA1K = TableRelease(dataset="agiqa1k", labels="AIGC_MOS_Zscore.xlsx", name_column="Image", score_column="MOS",
                       score_range=(0, 5), scale="MOS 0-5", image_folders=("file", "images", "."),
                       text_extras=("Prompt",))

# AGIQA-3K: 2,982 AI-generated images; `data.csv`
# (`name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align`, MOS 0-5). The quality
# (perception) MOS is the target, / 5; the alignment MOS, both deviations, the prompt and its parts are
# kept as extra columns. The images ship as `file.zip` (unpacked to `file/`; some setups rename it
# `images/` or `image/`).
AGIQA3K = TableRelease(dataset="agiqa3k", labels="data.csv", name_column="name", score_column="mos_quality",
                       score_range=(0, 5), scale="quality MOS 0-5", image_folders=("file", "images", "image", "."),
                       number_extras=("std_quality", "mos_align", "std_align"),
                       text_extras=("prompt", "adj1", "adj2", "style"))

# AGIQA-3K with the alignment MOS (how well the image matches its prompt, 0-5) as the target, / 5: the
# optional target SPEC names for AGIQA-3K. Same release, images and extra columns (the quality MOS kept
# as an extra); prepared under its own name, so its runs never mix with quality's.
AGIQA3K_ALIGN = replace(AGIQA3K, dataset="agiqa3k-align", score_column="mos_align", scale="alignment MOS 0-5",
                        number_extras=("std_align", "mos_quality", "std_quality"))

ADAPTERS: dict[str, Adapter] = {
    "koniq10k": Adapter(koniq10k.load, 10_073),
    "clive": Adapter(clive.load, 1_162),
    "kadid10k": Adapter(KADID10K.load, 10_125),
    "flive": Adapter(FLIVE.load, 39_810),
    "spaq": Adapter(SPAQ.load, 11_125),
    "agiqa1k": Adapter(AGIQA1K.load, 1_080, known_duplicates=frozenset({"dreamStudio_8_9_1_1.jpg"})),
    "agiqa3k": Adapter(AGIQA3K.load, 2_982),
    "agiqa3k-align": Adapter(AGIQA3K_ALIGN.load, 2_982),
    "csv": Adapter(custom_csv.load, None),  # no published count to compare with
}
