"""Prompt sets: antonym pairs (positive | negative) whose two-way softmax scores an image.

A set is named. Two come by name: `clipiqa`, the CLIP-IQA paper's single pair (Wang et al., AAAI
2023: "Good photo." | "Bad photo."), and `pyiqa`, the five pairs pyiqa's `clipiqa` metric averages
(the default). Any other set is written out: pairs separated by `;`, the two prompts of a pair by
`|`, e.g. `Good photo.|Bad photo.;Sharp photo.|Blurry photo.`; its name is that text unless a
prompts-file line names it (`name = pairs`).
"""

from dataclasses import dataclass
from pathlib import Path

PAIR_SEPARATOR, PROMPT_SEPARATOR, NAME_SEPARATOR = ";", "|", "="


@dataclass(frozen=True)
class PromptSet:
    name: str
    pairs: tuple[tuple[str, str], ...]  # (positive, negative) each

    @property
    def prompts(self) -> list[str]:
        """Every prompt, positive then negative of each pair in turn: the rows of the text embeddings."""
        return [prompt for pair in self.pairs for prompt in pair]


NAMED = {
    "clipiqa": PromptSet("clipiqa", (("Good photo.", "Bad photo."),)),
    "pyiqa": PromptSet("pyiqa", (
        ("Good image", "bad image"),
        ("Sharp image", "blurry image"),
        ("sharp edges", "blurry edges"),
        ("High resolution image", "low resolution image"),
        ("Noise-free image", "noisy image"),
    )),
}
DEFAULT = "pyiqa"


def parse_set(text: str, name: str | None = None) -> PromptSet:
    """A set's name (`clipiqa`, `pyiqa`) or its pairs written out; `name` names a written-out set."""
    text = text.strip()
    if text in NAMED and name is None:
        return NAMED[text]
    pairs = []
    for part in text.split(PAIR_SEPARATOR):
        if not part.strip():
            continue
        prompts = [p.strip() for p in part.split(PROMPT_SEPARATOR)]
        if len(prompts) != 2 or not all(prompts):
            raise ValueError(f"prompt pair {part.strip()!r} must be two prompts, positive|negative (e.g. "
                             f"'Good photo.|Bad photo.'); pairs are separated by ';', or name a set: {', '.join(NAMED)}")
        pairs.append(tuple(prompts))
    if not pairs:
        raise ValueError(f"empty prompt set {text!r}; write pairs like 'Good photo.|Bad photo.' or name a set: {', '.join(NAMED)}")
    return PromptSet(name or PAIR_SEPARATOR.join(PROMPT_SEPARATOR.join(p) for p in pairs), tuple(pairs))


def read_prompts_file(path: Path) -> list[PromptSet]:
    """One set per line (`name = pairs`, bare pairs, or a set's name); blank lines and `#` comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the prompts file {path}: {getattr(error, 'strerror', None) or error}") from None
    sets = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, pairs = line.partition(NAME_SEPARATOR) if NAME_SEPARATOR in line else (None, "", line)
        try:
            sets.append(parse_set(pairs, name.strip() if name is not None else None))
        except ValueError as error:
            raise ValueError(f"{path} line {number}: {error}") from None
    if not sets:
        raise ValueError(f"{path} holds no prompt set; write one per line, e.g. 'sharpness = Sharp photo.|Blurry photo.'")
    return sets


def prompt_sets(prompts: list[str], prompts_file: Path | None) -> list[PromptSet]:
    """The sets asked for (each `--prompts`, then the file's), the default set when none; names must differ."""
    sets = [parse_set(text) for text in prompts] + (read_prompts_file(prompts_file) if prompts_file else [])
    sets = sets or [NAMED[DEFAULT]]
    names = [s.name for s in sets]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"prompt set {twice[0]!r} is given twice; each set is one row, so name each once")
    return sets
