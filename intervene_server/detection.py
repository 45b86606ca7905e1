"""Offline language identification of prompt text, whole or per sentence.

py3langid (a bundled naive-Bayes model, ISO 639-1 labels) gives a normalised
probability; labels are mapped to FLORES-200 codes through the language table.
"""

import re
from dataclasses import dataclass
from functools import cached_property

from lingosteer.languages import UnknownLanguageError, normalize_code

DEFAULT_MIN_CONFIDENCE = 0.5

# A sentence: text up to and including its end punctuation (or a line break).
_SENTENCE = re.compile(r"[^.!?\n。！？]*(?:[.!?。！？]+|\n+|$)")
# Segments shorter than this (in letters) are too short to identify alone and
# are merged into the previous segment.
_MIN_SEGMENT_LETTERS = 12


@dataclass(frozen=True)
class Detection:
    language: str | None  # FLORES-200 code, None if the label is not in the language table
    label: str  # the identifier's own label (ISO 639-1)
    confidence: float


@dataclass(frozen=True)
class Segment:
    start: int  # character offsets into the text, [start, end)
    end: int
    detection: Detection


class LanguageDetector:
    def __init__(self, min_confidence: float = DEFAULT_MIN_CONFIDENCE):
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"language confidence threshold must lie in [0, 1], got {min_confidence}")
        self.min_confidence = min_confidence

    @cached_property
    def _identifier(self):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def detect(self, text: str) -> Detection:
        label, confidence = self._identifier.classify(text)
        try:
            language = normalize_code(label)
        except UnknownLanguageError:
            language = None
        return Detection(language=language, label=label, confidence=float(confidence))

    def detect_segments(self, text: str) -> list[Segment]:
        """Sentences of `text` with their languages; neighbours in one language are merged.

        Each sentence is identified alone, and each merged segment once more as a whole
        (its confidence comes from all of its text): every character is classified at
        most twice, so the cost is linear in the length of the text.
        """
        segments: list[Segment] = []
        merged: set[int] = set()  # indices of segments made of several sentences
        for start, end in split_sentences(text):
            detection = self.detect(text[start:end])
            if segments and segments[-1].detection.language == detection.language:
                start = segments.pop().start
                merged.add(len(segments))
            segments.append(Segment(start, end, detection))
        return [
            Segment(s.start, s.end, self.detect(text[s.start:s.end])) if index in merged else s
            for index, s in enumerate(segments)
        ]


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text`, short fragments joined to their predecessor."""
    spans: list[tuple[int, int]] = []
    for match in _SENTENCE.finditer(text):
        start, end = match.span()
        if not text[start:end].strip():
            continue
        letters = sum(ch.isalpha() for ch in text[start:end])
        if spans and letters < _MIN_SEGMENT_LETTERS:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    # A short first fragment is joined to the sentence after it.
    if len(spans) > 1 and sum(ch.isalpha() for ch in text[slice(*spans[0])]) < _MIN_SEGMENT_LETTERS:
        spans[:2] = [(spans[0][0], spans[1][1])]
    return spans
