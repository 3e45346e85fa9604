"""Vocabularies, prompt templates and text encoders.

Class-name spellings follow OpenScene's ``dataset/label_constants.py`` exactly (including its
misspellings such as ``"refridgerator"`` and ``"excercise equipment"``), because evaluation
protocols index classes by position and prompts embed the spelling.

Text encoders map prompts or captions to unit vectors in one shared embedding space; every 2D
teacher, the distilled 3D model and the query interface use the same encoder (SAS section 3.1,
"model alignment via text"). Two implementations:

* :class:`OpenClipTextEncoder`: an open_clip model loaded from a local checkpoint.
* :class:`SyntheticTextEncoder`: fixed unit vectors per class name, for the synthetic world and
  tests (no weights needed).

Every encoder has ``.config()`` (plain JSON) and :func:`text_encoder_from_config` rebuilds it, so
checkpoints can say which text space their features live in.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

SCANNET_20 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain",
    "toilet", "sink", "bathtub", "otherfurniture",
)

MATTERPORT_21 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "other", "ceiling",
)

MATTERPORT_40 = (
    "wall", "door", "ceiling", "floor", "picture", "window", "chair", "pillow", "lamp", "cabinet",
    "curtain", "table", "plant", "mirror", "towel", "sink", "shelves", "sofa", "bed",
    "night stand", "toilet", "column", "banister", "stairs", "stool", "vase", "television", "pot",
    "desk", "box", "coffee table", "counter", "bench", "garbage bin", "fireplace", "clothes",
    "bathtub", "book", "air vent", "faucet",
)

# The longer Matterport vocabularies extend the shorter ones (OpenScene's lists share prefixes).
MATTERPORT_80 = MATTERPORT_40 + (
    "photo", "toilet paper", "fan", "railing", "sculpture", "dresser", "rug", "ottoman", "bottle",
    "refridgerator", "bookshelf", "wardrobe", "pipe", "monitor", "stand", "drawer", "container",
    "light switch", "purse", "door way", "basket", "chandelier", "oven", "clock", "stove",
    "washing machine", "shower curtain", "fire alarm", "bin", "chest", "microwave", "blinds",
    "bowl", "tissue box", "plate", "tv stand", "shoe", "heater", "headboard", "bucket",
)

MATTERPORT_160 = MATTERPORT_80 + (
    "candle", "flower pot", "speaker", "furniture", "sign", "air conditioner", "fire extinguisher",
    "curtain rod", "floor mat", "printer", "telephone", "blanket", "handle", "shower head", "soap",
    "keyboard", "thermostat", "radiator", "kitchen island", "paper towel", "sheet", "glass",
    "dishwasher", "cup", "ladder", "garage door", "hat", "exit sign", "piano", "board", "rope",
    "ball", "excercise equipment", "hanger", "candlestick", "light", "scale", "bag", "laptop",
    "treadmill", "guitar", "display case", "toilet paper holder", "bar", "tray", "urn",
    "decorative plate", "pool table", "jacket", "bottle of soap", "water cooler", "utensil",
    "tea pot", "stuffed animal", "paper towel dispenser", "lamp shade", "car", "toilet brush",
    "doll", "drum", "whiteboard", "range hood", "candelabra", "toy", "foot rest", "soap dish",
    "placemat", "cleaner", "computer", "knob", "paper", "projector", "coat hanger", "case", "pan",
    "luggage", "trinket", "chimney", "person", "alarm",
)

NUSCENES_16 = (
    "barrier", "bicycle", "bus", "car", "construction vehicle", "motorcycle", "person",
    "traffic cone", "trailer", "truck", "drivable surface", "other flat", "sidewalk", "terrain",
    "manmade", "vegetation",
)

VOCABULARIES: Dict[str, Tuple[str, ...]] = {
    "scannet20": SCANNET_20,
    "matterport21": MATTERPORT_21,
    "matterport40": MATTERPORT_40,
    "matterport80": MATTERPORT_80,
    "matterport160": MATTERPORT_160,
    "nuscenes16": NUSCENES_16,
}
"""Named vocabularies (names are case- and separator-insensitive in :func:`get_vocabulary`)."""

_VOCAB_ALIASES = {
    "scannet": "scannet20", "matterport": "matterport21", "nuscenes": "nuscenes16",
    "scannet3d": "scannet20", "matterport3d": "matterport21", "nuscenes3d": "nuscenes16",
}


def get_vocabulary(name: str) -> Tuple[str, ...]:
    """The class names of a named vocabulary.

    Accepts ``"scannet20"``, ``"ScanNet-20"``, ``"scannet_20"``, ``"matterport160"``,
    ``"nuscenes16"``, ... (case and ``-``/``_``/space separators ignored), plus the dataset
    names ``"scannet"``, ``"matterport"`` (21 classes) and ``"nuscenes"``.
    """
    key = re.sub(r"[\s_\-]", "", str(name).lower())
    key = _VOCAB_ALIASES.get(key, key)
    if key not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABULARIES)}")
    return VOCABULARIES[key]


def parse_vocabulary(spec) -> Tuple[str, ...]:
    """Class names from a vocabulary spec: THE parser of every ``--vocab``/``--vocabulary`` value.

    ``spec`` is a named vocabulary (``scannet20``, ``matterport160``, ... see :func:`get_vocabulary`),
    a text file with one name per line (``#`` comments and blank lines skipped), or comma-separated
    names ``"chair,table,lamp"`` (a single class: ``"chair,"``); a sequence of names is taken as is.
    An unknown name is an error, never a one-class vocabulary named like the typo; duplicates are
    errors too.
    """
    from pathlib import Path

    if isinstance(spec, (list, tuple)):
        names = tuple(str(n).strip() for n in spec)
        what = "the class names"
    else:
        spec = str(spec).strip()
        if not spec:
            raise ValueError("empty vocabulary")
        p = Path(spec).expanduser()
        if p.suffix in (".txt", ".csv") or p.is_file():
            if not p.is_file():
                raise FileNotFoundError(f"vocabulary file {p} not found")
            names = tuple(n for n in (ln.strip() for ln in p.read_text(encoding="utf-8").splitlines())
                          if n and not n.startswith("#"))
            what = f"vocabulary file {p}"
        elif "," in spec:
            names = tuple(n.strip() for n in spec.split(",") if n.strip())
            what = repr(spec)
        else:
            try:
                return tuple(get_vocabulary(spec))
            except ValueError as e:
                raise ValueError(f"{e}; or give a file with one class name per line, or comma-separated names "
                                 "such as 'chair,table' (one class: 'chair,')") from None
    if not names or not all(names):
        raise ValueError(f"no class names in {what}" if not names else f"empty class name in {what}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate class names in {what}: {', '.join(dup)}")
    return names


# ----------------------------------------------------------------------------------- prompts

PROMPT_TEMPLATE = "a {} in a scene"
"""OpenScene's and SAS's inference prompt ("prompt engineering" in OpenScene)."""

CAPTION_TEMPLATE = "a {}"
"""Default caption of a mask labelled ``label`` (text alignment without a captioner)."""

SCENE_TEMPLATES = (
    "a {} in a scene",
    "a photo of a {}.",
    "a photo of the {} in a room.",
    "a photo of a {} in an indoor scene.",
    "there is a {} in the scene.",
    "there is the {} in the room.",
    "a cropped photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a rendering of a {}.",
    "a blurry photo of a {}.",
)
"""A small ensemble of indoor-scene prompts; embeddings are averaged over templates."""

TEMPLATE_ENSEMBLES: Dict[str, Tuple[str, ...]] = {
    "openscene": (PROMPT_TEMPLATE,),
    "scene": SCENE_TEMPLATES,
    "caption": (CAPTION_TEMPLATE,),
    "capability": ("a good photo of a {} in a room",),
}
"""Named template sets usable wherever ``templates`` is accepted."""

OPENSCENE_OTHER_PROMPTS = {"otherfurniture": "other", "other": "other"}
"""OpenScene's evaluation replaces the prompt of the catch-all class by the bare word "other"."""


def get_templates(templates: "str | Sequence[str] | None") -> Tuple[str, ...]:
    """Resolve ``None`` (-> ``(PROMPT_TEMPLATE,)``), an ensemble name or a list of templates."""
    if templates is None:
        return (PROMPT_TEMPLATE,)
    if isinstance(templates, str):
        if templates in TEMPLATE_ENSEMBLES:
            return TEMPLATE_ENSEMBLES[templates]
        if "{" in templates or "}" in templates:
            return (check_template(templates),)
        raise ValueError(f"unknown template ensemble {clip_text(templates)!r}; known: {', '.join(TEMPLATE_ENSEMBLES)}"
                         " (or pass a template containing '{}')")
    out = tuple(templates)
    if not out or not all(isinstance(t, str) for t in out):
        raise ValueError(f"templates must be non-empty strings with exactly one '{{}}', got {clip_text(repr(out))}")
    return tuple(check_template(t) for t in out)


#: Longest prompt template :func:`check_template` accepts by default (characters).
MAX_TEMPLATE_LENGTH = 200


def clip_text(text, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters with ``...`` appended when longer: echo user input in
    replies and logs without echoing megabytes."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def check_template(template, max_length: int = MAX_TEMPLATE_LENGTH) -> str:
    """``template`` if it is a usable prompt template, else ValueError saying why.

    A template is plain text with exactly one ``{}`` slot for the class name: no other brace (no
    ``{{`` escapes, no ``{0}``/``{name}`` fields), no format spec (``{:>50000000}`` would cost
    memory) and no conversion (``{!r}``); at most ``max_length`` characters. THE check of every
    template: the mapping node's ``set_vocabulary`` and ``prompt_template``, and the CLI's
    ``--templates`` (:func:`get_templates`).
    """
    if not isinstance(template, str):
        raise ValueError(f"prompt template must be a string, got {type(template).__name__}")
    if len(template) > max_length:
        raise ValueError(f"prompt template of {len(template)} characters, more than the limit of {max_length}")
    if template.count("{") != 1 or template.count("}") != 1 or "{}" not in template:
        raise ValueError(f"prompt template {clip_text(template)!r} must contain exactly one '{{}}' and no "
                         "other brace (no format spec, conversion or field name)")
    return template


def check_texts(texts, max_texts: int = 0, max_length: int = 0, what: str = "query text") -> List[str]:
    """``texts`` as a list of strings within the bounds: at most ``max_texts`` texts (parameter
    ``max_query_texts``; 0 = no limit), each at most ``max_length`` characters (``max_text_length``;
    0 = no limit). ValueError naming the limit otherwise (the text itself clipped)."""
    texts = [str(t) for t in texts]
    if max_texts and len(texts) > max_texts:
        raise ValueError(f"{len(texts)} {what}s, more than the limit of {max_texts} (max_query_texts)")
    for i, t in enumerate(texts):
        if max_length and len(t) > max_length:
            raise ValueError(f"{what} {i} has {len(t)} characters, more than the limit of {max_length} "
                             f"(max_text_length): {clip_text(t)!r}")
    return texts


def check_vocabulary(names, max_names: int = 0, max_length: int = 0) -> Tuple[str, ...]:
    """Class names stripped, blanks dropped, then checked: at most ``max_names`` (0 = no limit),
    each at most ``max_length`` characters (0 = no limit), no duplicates (case-insensitive).
    ValueError naming the limit or the duplicates."""
    out = tuple(n for n in (str(x).strip() for x in names) if n)
    if max_names and len(out) > max_names:
        raise ValueError(f"{len(out)} class names, more than the limit of {max_names} (max_vocabulary)")
    long = [n for n in out if max_length and len(n) > max_length]
    if long:
        raise ValueError(f"{len(long)} class name(s) longer than the limit of {max_length} characters "
                         f"(max_text_length): {', '.join(repr(clip_text(n)) for n in long[:5])}"
                         + (f" and {len(long) - 5} more" if len(long) > 5 else ""))
    counts: Dict[str, int] = {}
    first: Dict[str, str] = {}
    for n in out:
        k = n.casefold()
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, n)
    dup = [(first[k], c) for k, c in counts.items() if c > 1]
    if dup:
        shown = ", ".join(f"{clip_text(n)!r} x{c}" for n, c in dup[:10])
        raise ValueError(f"{sum(c - 1 for _, c in dup)} duplicate class name(s) (case-insensitive): {shown}"
                         + (f" and {len(dup) - 10} more" if len(dup) > 10 else ""))
    return out


def format_prompts(names: Sequence[str], template: str = PROMPT_TEMPLATE,
                   openscene_other: bool = False) -> List[str]:
    """``[template.format(name) for name in names]``; with ``openscene_other`` the catch-all
    class (``otherfurniture`` / ``other``) becomes the bare prompt ``"other"`` as in OpenScene."""
    out = []
    for name in names:
        if openscene_other and name in OPENSCENE_OTHER_PROMPTS:
            out.append(OPENSCENE_OTHER_PROMPTS[name])
        else:
            out.append(template.format(name))
    return out


# ------------------------------------------------------------------------------ text encoders

class UnknownWordError(ValueError):
    """A synthetic text encoder was given words it does not know."""

    def __init__(self, words: Sequence[str], text: str):
        self.words = tuple(words)
        self.text = text
        super().__init__(f"unknown word(s) {', '.join(repr(w) for w in self.words)} in text {text!r} "
                         "(the synthetic text encoder only knows its vocabulary's class names, "
                         "template words and a fixed list of attribute words)")


class TextEncoder(Protocol):
    """Maps texts to L2-normalised embeddings of a shared space.

    Attributes:
        dim: embedding size C.
    """

    dim: int

    def encode(self, texts: Sequence[str]) -> "torch.Tensor":
        """(N, C) float32 CPU tensor, rows L2-normalised."""
        ...

    def config(self) -> dict:
        """Plain-JSON description that :func:`text_encoder_from_config` turns back into the encoder."""
        ...


def class_embeddings(encoder: TextEncoder, names: Sequence[str],
                     templates: "str | Sequence[str] | None" = None,
                     openscene_other: bool = False) -> "torch.Tensor":
    """Class text embeddings averaged over a template ensemble.

    Args:
        encoder: any :class:`TextEncoder`.
        names: K class names.
        templates: ``None`` (``PROMPT_TEMPLATE``), an ensemble name or templates with ``{}``.
        openscene_other: use OpenScene's bare ``"other"`` prompt for the catch-all class.
    Returns:
        (K, C) float32, rows L2-normalised (mean of the normalised per-template embeddings,
        renormalised, as CLIP's zero-shot classifiers do).
    """
    import torch

    names = list(names)
    if not names:
        raise ValueError("class_embeddings needs at least one class name")
    templates = get_templates(templates)
    prompts = [p for t in templates for p in format_prompts(names, t, openscene_other)]
    emb = encoder.encode(prompts).float().reshape(len(templates), len(names), -1)
    emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
    return torch.nn.functional.normalize(emb, dim=-1)


def text_labels(features, text, normalize: bool = False, chunk: int = 65536) -> "Tuple[torch.Tensor, torch.Tensor]":
    """The ONE argmax against class text embeddings: labels and scores ``argmax_k / max_k f . t_k``.

    Args:
        features: (..., C) features (torch or NumPy; any float dtype, computed in float32).
        text: (K, C) class text embeddings.
        normalize: L2-normalise features and text first, so scores are cosines (the inference
            rule, TESD pseudo-labels). Without it scores are raw dot products (eq. 6 of the
            fusion, teacher masks). The argmax is the same either way when the text rows are
            unit vectors (``f . t_k`` scales with ``|f|`` only); the scores differ.
        chunk: rows per matrix product (bounds the (chunk, K) score block).

    Returns:
        labels (...,) int64 and scores (...,) float32, torch tensors on ``features``' device.
        Rows that are all zero get label 0 and score 0.
    """
    import torch

    f = torch.as_tensor(features)
    t = torch.as_tensor(text).to(f.device, torch.float32)
    if t.dim() != 2 or f.shape[-1] != t.shape[1] or len(t) == 0:
        raise ValueError(f"features (..., {f.shape[-1] if f.dim() else '?'}) and text {tuple(t.shape)} do not match: "
                         "expected (..., C) and (K, C) with K >= 1")
    if normalize:
        t = torch.nn.functional.normalize(t, dim=1)
    lead = f.shape[:-1]
    flat = f.reshape(-1, f.shape[-1])
    labels = torch.empty(len(flat), dtype=torch.int64, device=f.device)
    scores = torch.empty(len(flat), dtype=torch.float32, device=f.device)
    step = max(1, int(chunk))
    for a in range(0, len(flat), step):
        block = flat[a:a + step].float()
        if normalize:
            block = torch.nn.functional.normalize(block, dim=1)
        best = (block @ t.T).max(dim=1)
        scores[a:a + step], labels[a:a + step] = best.values, best.indices
    return labels.reshape(lead), scores.reshape(lead)


def stable_seed(*parts) -> int:
    """A 64-bit seed from strings/ints, stable across processes and platforms."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def _words(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# Words that carry no meaning in the synthetic space: template words and glue.
_FUNCTION_WORDS = frozenset(
    "a an the of in on at to with and or is are there this that it its some one two three "
    "photo picture image rendering render view scene room indoor indoors outdoor good nice "
    "bright dark blurry cropped close up closeup small large big tiny "
    "showing shows show contains containing next near by".split()
)
# Attribute words: each adds a small fixed direction (see SyntheticTextEncoder).
ATTRIBUTE_WORDS = tuple(
    "white black grey gray brown red green blue yellow orange purple pink beige dark light "
    "wooden wood metal metallic plastic glass leather fabric stone marble ceramic painted "
    "old new modern vintage round square rectangular tall short long wide narrow open closed "
    "empty full soft hard shiny striped patterned folded broken clean dirty single double "
    "left right front back corner office kitchen bathroom bedroom living".split()
)


class SyntheticTextEncoder:
    """Fixed unit vectors per class name: the text space of the synthetic world.

    Each class name gets a Gaussian random unit vector drawn from a generator seeded by
    ``(seed, name, dim)`` only, so a name has the same vector in every vocabulary that contains
    it (vectors of different names are nearly orthogonal: |cos| ~ 1/sqrt(dim)).

    A text is understood when it consists of known class names, function words (articles,
    prepositions, template words such as "photo", "scene", "room") and attribute words
    (:data:`ATTRIBUTE_WORDS`: colours, materials, shapes). Texts matching one of the known
    templates (:data:`TEMPLATE_ENSEMBLES`) are parsed by their slot first, so
    "a photo of a picture" is the class "picture". The embedding is

        normalise(mean(class vectors mentioned) + attribute_weight * sum(attribute vectors))

    where each attribute word has its own fixed random unit vector. Hence every prompt made from
    a template and a class name ("a chair in a scene", "a photo of a chair.") encodes *exactly*
    to the class vector, while captions with attributes ("a wooden chair") differ slightly
    (cosine ~ 1/sqrt(1 + attribute_weight^2) per attribute), like real captions do.
    Texts with no class name or with unknown words raise :class:`UnknownWordError`.

    Args:
        vocabulary: class names understood (any vocabulary; default ScanNet-20).
        dim: embedding size.
        seed: seed of the vectors.
        attribute_weight: norm of each attribute component before renormalisation.
        aliases: extra phrases mapped to class names; by default ``"other"`` means
            ``"otherfurniture"`` when only the latter is in the vocabulary (OpenScene's prompt).
    """

    def __init__(self, vocabulary: Sequence[str] = SCANNET_20, dim: int = 512, seed: int = 0,
                 attribute_weight: float = 0.1, aliases: Optional[Mapping[str, str]] = None):
        vocabulary = tuple(str(v) for v in vocabulary)
        if not vocabulary:
            raise ValueError("SyntheticTextEncoder needs a non-empty vocabulary")
        if len(set(vocabulary)) != len(vocabulary):
            dup = sorted({v for v in vocabulary if vocabulary.count(v) > 1})
            raise ValueError(f"duplicate class names in vocabulary: {dup}")
        if int(dim) < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        if attribute_weight < 0:
            raise ValueError("attribute_weight must be >= 0")
        self.vocabulary = vocabulary
        self.dim = int(dim)
        self.seed = int(seed)
        self.attribute_weight = float(attribute_weight)
        if aliases is None:
            aliases = {"other": "otherfurniture"} if ("otherfurniture" in vocabulary
                                                      and "other" not in vocabulary) else {}
        for alias, target in aliases.items():
            if target not in vocabulary:
                raise ValueError(f"alias {alias!r} points to {target!r}, which is not in the vocabulary")
        self.aliases = dict(aliases)
        self._vectors = np.stack([self._unit_vector("class", name) for name in vocabulary])
        self._index = {name: i for i, name in enumerate(vocabulary)}
        # phrase (tuple of words) -> class index, longest phrases matched first
        self._phrases: Dict[Tuple[str, ...], int] = {}
        for name, i in self._index.items():
            self._phrases[tuple(_words(name))] = i
        for alias, target in self.aliases.items():
            self._phrases.setdefault(tuple(_words(alias)), self._index[target])
        self._max_phrase = max(len(p) for p in self._phrases)
        self._attr_index = {w: i for i, w in enumerate(ATTRIBUTE_WORDS)}
        self._attr_vectors = np.stack([self._unit_vector("attribute", w) for w in ATTRIBUTE_WORDS])
        templates = {t for ts in TEMPLATE_ENSEMBLES.values() for t in ts}
        self._template_res = [
            re.compile("^" + re.escape(t.lower().strip(" .")).replace(r"\{\}", "(.+)") + "$")
            for t in sorted(templates, key=len, reverse=True)
        ]

    def _unit_vector(self, kind: str, name: str) -> np.ndarray:
        rng = np.random.default_rng(stable_seed("sas-synthetic-text", kind, self.seed, self.dim, name))
        v = rng.standard_normal(self.dim)
        return v / np.linalg.norm(v)

    def class_vectors(self, names: Optional[Sequence[str]] = None) -> np.ndarray:
        """(K, dim) float64 unit vectors of ``names`` (default: the whole vocabulary)."""
        if names is None:
            return self._vectors.copy()
        missing = [n for n in names if n not in self._index]
        if missing:
            raise UnknownWordError(missing, ", ".join(names))
        return self._vectors[[self._index[n] for n in names]]

    def with_vocabulary(self, vocabulary: Sequence[str]) -> "SyntheticTextEncoder":
        """The same space (seed, dim, attribute weight) understanding another vocabulary."""
        return SyntheticTextEncoder(vocabulary, self.dim, self.seed, self.attribute_weight)

    def parse(self, text: str) -> Tuple[List[str], List[str]]:
        """(class names mentioned, attribute words) of ``text``; raises UnknownWordError."""
        stripped = text.lower().strip().strip(" .")
        for pattern in self._template_res:
            m = pattern.match(stripped)
            if m:
                try:
                    return self._parse_words(_words(m.group(1)), text)
                except UnknownWordError:
                    pass  # slot not understood alone: fall back to parsing the whole text
        return self._parse_words(_words(text), text)

    def _parse_words(self, words: List[str], text: str) -> Tuple[List[str], List[str]]:
        classes, attributes, unknown = [], [], []
        i = 0
        while i < len(words):
            for n in range(min(self._max_phrase, len(words) - i), 0, -1):
                idx = self._phrases.get(tuple(words[i:i + n]))
                if idx is not None:
                    classes.append(self.vocabulary[idx])
                    i += n
                    break
            else:
                w = words[i]
                if w in self._attr_index:
                    attributes.append(w)
                elif w not in _FUNCTION_WORDS:
                    unknown.append(w)
                i += 1
        if unknown:
            raise UnknownWordError(unknown, text)
        if not classes:
            raise UnknownWordError([], text) if not words else UnknownWordError(
                [f"(no class name among {' '.join(words)!r})"], text)
        return classes, attributes

    def encode_numpy(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float64 unit vectors (see the class docstring for the rule)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not a single string")
        out = np.empty((len(texts), self.dim))
        for row, text in enumerate(texts):  # loop over texts, not pixels
            classes, attributes = self.parse(text)
            v = self._vectors[[self._index[c] for c in classes]].mean(0)
            if attributes and self.attribute_weight > 0:
                v = v + self.attribute_weight * self._attr_vectors[[self._attr_index[a] for a in attributes]].sum(0)
            out[row] = v / np.linalg.norm(v)
        return out

    def encode(self, texts: Sequence[str]) -> "torch.Tensor":
        """(N, dim) float32 L2-normalised embeddings."""
        import torch

        return torch.from_numpy(self.encode_numpy(texts).astype(np.float32))

    def config(self) -> dict:
        return {"kind": "synthetic", "vocabulary": list(self.vocabulary), "dim": self.dim,
                "seed": self.seed, "attribute_weight": self.attribute_weight,
                "aliases": dict(self.aliases)}

    def __repr__(self) -> str:
        return f"SyntheticTextEncoder({len(self.vocabulary)} classes, dim={self.dim}, seed={self.seed})"


class OpenClipTextEncoder:
    """The text tower of an open_clip model loaded from a local checkpoint.

    Args:
        model_name: open_clip architecture name (``"ViT-B-16"``, ``"ViT-L-14-336"``, ...).
        checkpoint_path: local weights file (an open_clip state dict: ``.bin``/``.safetensors``/
            ``.pt``, as published on the open_clip Hugging Face pages), or an open_clip
            ``local-dir`` folder. A missing file raises one FileNotFoundError naming it and what
            to download. Nothing is ever downloaded.
        device: torch device.
        batch_size: texts per forward pass.
        model: an already-built open_clip model (the checkpoint is then only recorded in
            ``config()``); used to share one model between teachers and tests.
    """

    def __init__(self, model_name: str, checkpoint_path: Optional[str], device: str = "cpu",
                 batch_size: int = 256, model=None):
        from sas_core.clip import load_open_clip, open_clip_tokenizer

        self.model_name = str(model_name)
        self.checkpoint_path = None if checkpoint_path is None else str(checkpoint_path)
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.model = model if model is not None else load_open_clip(self.model_name, self.checkpoint_path,
                                                                    self.device)
        self.tokenizer = open_clip_tokenizer(self.model_name)
        self.dim = int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) \
            is not None and hasattr(self.model.text_projection, "shape") else int(self._probe_dim())

    def _probe_dim(self) -> int:
        return int(self.encode(["a"]).shape[1])

    def encode(self, texts: Sequence[str]) -> "torch.Tensor":
        """(N, C) float32 CPU tensor, L2-normalised."""
        import torch

        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not a single string")
        texts = list(texts)
        if not texts:
            raise ValueError("encode() needs at least one text")
        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[start:start + self.batch_size]).to(device)
                emb = self.model.encode_text(tokens).float()
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
        return torch.cat(out)

    def config(self) -> dict:
        return {"kind": "open_clip", "model": self.model_name, "checkpoint": self.checkpoint_path}

    def __repr__(self) -> str:
        return f"OpenClipTextEncoder({self.model_name!r}, {self.checkpoint_path!r}, dim={self.dim})"


def text_encoder_from_config(config: Mapping, device: str = "cpu") -> TextEncoder:
    """Rebuild a text encoder from its ``.config()`` dict (as stored in checkpoints)."""
    if not isinstance(config, Mapping) or "kind" not in config:
        raise ValueError(f"text encoder config must be a dict with a 'kind', got {config!r}")
    kind = config["kind"]
    if kind == "synthetic":
        return SyntheticTextEncoder(
            vocabulary=tuple(config.get("vocabulary", SCANNET_20)), dim=int(config.get("dim", 512)),
            seed=int(config.get("seed", 0)), attribute_weight=float(config.get("attribute_weight", 0.1)),
            aliases=config.get("aliases"),
        )
    if kind == "open_clip":
        if "model" not in config:
            raise ValueError("open_clip text encoder config needs 'model'")
        return OpenClipTextEncoder(config["model"], config.get("checkpoint"), device=device)
    raise ValueError(f"unknown text encoder kind {kind!r} (known: 'synthetic', 'open_clip')")
