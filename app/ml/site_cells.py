"""A laboratory's reviewed cells as adaptation takes them, and the least it needs of them.

Kept apart from `app.ml.adapt` (which loads TensorFlow) so the command line's help and the database side
(`app.services.site_data`) can use them without loading the network stack.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import PapcadError

# Fewer reviewed cells, or fewer accessions, cannot give a grouped train / validation / test split
# with enough cells on each side to fit a cut-off and to judge the result.
MIN_REVIEWED_CELLS = 40
MIN_ACCESSIONS = 5
# The recipe's defaults for `papcad adapt` (see app.ml.finetune.AdaptConfig): passes over the site's training
# cells, the peak learning rate, and the most steps in all (so a very large site's time stays bounded).
ADAPT_EPOCHS = 4
ADAPT_LEARNING_RATE = 2e-4
ADAPT_MAX_STEPS = 260


class TooFewCellsError(PapcadError):
    """Not enough reviewed cells (or accessions) to adapt and still judge the result."""


@dataclass(frozen=True)
class SiteCell:
    """One reviewed cell of the laboratory: its stored image, its final label, its accession."""

    data: bytes
    label: str
    group: str  # the accession (or the image itself when the cell came without one)


def check_enough(cells: Sequence[SiteCell]) -> None:
    """Raise TooFewCellsError unless the cells can be split by accession and still judged."""
    accessions = len({c.group for c in cells})
    if len(cells) < MIN_REVIEWED_CELLS or accessions < MIN_ACCESSIONS:
        raise TooFewCellsError(
            f"{len(cells)} reviewed cells from {accessions} accessions; adaptation needs at least "
            f"{MIN_REVIEWED_CELLS} reviewed cells from at least {MIN_ACCESSIONS} accessions "
            "(review more cells, or widen --since)"
        )
