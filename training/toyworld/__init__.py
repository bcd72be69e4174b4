"""The procedural toy world (coloured shapes, captions, downstream styles) used to pretrain and benchmark a
small CLIP offline: :mod:`training.toyworld.world` (scenes, captions, datasets; the one import for users),
:mod:`training.toyworld.scene` (vocabulary), :mod:`training.toyworld.render` (drawing),
:mod:`training.toyworld.provider` (the styles as datasets of the protocol runner), :mod:`training.protocols.toybench`
(the ``bench toyworld`` preset), :mod:`training.toyworld.pretrain` and :mod:`training.toyworld.preview`
(contact sheets)."""
