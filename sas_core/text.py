"""Vocabularies, prompt templates and text encoders.

Class-name spellings follow OpenScene's ``dataset/label_constants.py`` exactly, because
evaluation protocols index classes by position and prompts embed the spelling.
"""

from __future__ import annotations

SCANNET_20 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain",
    "toilet", "sink", "bathtub", "otherfurniture",
)
