"""The procedural toy world (coloured shapes, captions, downstream styles) used to pretrain and benchmark a
small CLIP offline: :mod:`training.toyworld.world` (rendering, datasets), :mod:`training.toyworld.preview`
(contact sheets)."""
