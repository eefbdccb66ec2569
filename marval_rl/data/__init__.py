"""Data: the offline emoji-56 set, ImageFolder / cached-latent sources, class names and prompt templates.

Quick use::

    from marval_rl.data import EmojiDataset, render, build_source, prompt
    train = EmojiDataset("train", image_size=32, per_class=64, augment="light")
    x, y = train[0]                         # float [3, 32, 32] in [-1, 1], int label
    prompt(train.class_names[y], "paper")   # "A harmonious and high quality image of lion"
"""
from .emoji import (NUM_CLASSES, Augment, EmojiClass, EmojiDataset, class_names, emoji_classes, load_sprites,
                    render, split_seed)
from .prompts import TEMPLATES, TRAIN_TEMPLATES, class_prompts, imagenet_class_names, prompt
from .sources import (SOURCES, CachedLatentSource, ImageFolderSource, build_source, cache_latents,
                      center_crop_arr)

__all__ = [
    "NUM_CLASSES", "Augment", "EmojiClass", "EmojiDataset", "class_names", "emoji_classes", "load_sprites",
    "render", "split_seed",
    "TEMPLATES", "TRAIN_TEMPLATES", "class_prompts", "imagenet_class_names", "prompt",
    "SOURCES", "CachedLatentSource", "ImageFolderSource", "build_source", "cache_latents", "center_crop_arr",
]
