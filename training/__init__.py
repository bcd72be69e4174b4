"""promptclip training side: backbones, prompting wrappers, methods, the training loop, data and protocols.

Importing ``training`` is cheap (no torch); submodules import torch and open_clip.
"""
__version__ = "0.1.0"
