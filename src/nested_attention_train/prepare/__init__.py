"""Real training data from a folder of photos (``nested-attention data prepare``).

Persons: the face is found (:mod:`.faces`), aligned and cropped FFHQ-style (:mod:`.crops`), the caption's subject
word becomes "person" (:mod:`.words`), and the photo squared around the face is the target. Pets: the pet on white
around its mask (or the whole photo) is both subject and target, as in the paper. :func:`prepare` runs it all,
resumably and in parallel, and writes the folder that :func:`nested_attention_train.data.read_metadata` reads.
"""

from .runner import prepare
from .settings import PrepareSettings
from .words import SUBJECT_WORDS, WordReplacer, read_word_list

__all__ = ["SUBJECT_WORDS", "PrepareSettings", "WordReplacer", "prepare", "read_word_list"]
