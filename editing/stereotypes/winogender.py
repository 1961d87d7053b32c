"""WinoGender schemas (Rudinger et al. 2018, rudinger/winogender-schemas, MIT) as gender pairs.

Each of the 120 templates is written out with a male, a female and a neutral pronoun, once with
its named participant ("the customer") and once with "someone": 240 male/female sentence pairs
that differ in the pronoun alone (he/she, his/her, him/her: one token each for most tokenizers,
so the two sides align position by position). ``occupations-stats.tsv`` gives each occupation's
share of women (US Bureau of Labor Statistics, 2015), which says which pronoun is the
stereotypical one: the female sentence for occupations with more than 50% women, else the male.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from modelsurgery.editing.data import WINOGENDER_DIR, shared_data_path
from modelsurgery.editing.stereotypes.pairs import ContrastPair


@dataclass(frozen=True)
class WinoGenderPair:
    """One template with one participant, written with a male and with a female pronoun."""

    occupation: str
    participant: str
    answer: int
    male: str
    female: str
    percent_female: float

    def contrast_pair(self) -> ContrastPair:
        """Oriented by the occupation's statistics: the majority gender's sentence is stereo."""
        female_stereo = self.percent_female > 50.0
        return ContrastPair(
            stereo=self.female if female_stereo else self.male,
            anti=self.male if female_stereo else self.female,
            bias_type="gender",
            direction="stereo",
        )


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_winogender(folder: Path | None = None) -> list[WinoGenderPair]:
    """The 240 male/female pairs, in file order (neutral sentences are not used)."""
    root = folder or shared_data_path(WINOGENDER_DIR)
    stats = {
        row["occupation"]: float(row["bls_pct_female"])
        for row in _read_tsv(root / "occupations-stats.tsv")
    }
    # sentid = occupation.participant.answer.gender.txt
    sentences: dict[tuple[str, str, int], dict[str, str]] = {}
    for row in _read_tsv(root / "all_sentences.tsv"):
        occupation, participant, answer, gender, _ = row["sentid"].split(".")
        sentences.setdefault((occupation, participant, int(answer)), {})[gender] = row["sentence"]
    pairs = []
    for (occupation, participant, answer), by_gender in sentences.items():
        if occupation not in stats:
            raise ValueError(f"winogender: occupation {occupation!r} has no statistics")
        if "male" not in by_gender or "female" not in by_gender:
            raise ValueError(f"winogender: {occupation}.{participant}.{answer} lacks a gender")
        pairs.append(
            WinoGenderPair(
                occupation,
                participant,
                answer,
                by_gender["male"],
                by_gender["female"],
                stats[occupation],
            )
        )
    return pairs


def winogender_stereo_pairs(folder: Path | None = None) -> list[ContrastPair]:
    """WinoGender as stereotype pairs for bias scoring (see ``WinoGenderPair.contrast_pair``)."""
    return [pair.contrast_pair() for pair in load_winogender(folder)]
