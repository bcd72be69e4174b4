"""promptclip's app layer: the ``promptclip`` command line, the offline demo and the BentoML server launcher.

The distribution has three packages with a one-way dependency rule: ``serving`` (torch-free, imports nothing else of
the project), ``training`` (at most serving's contract modules) and ``export`` (training plus serving's contracts).
Something has to sit on top and wire the three together for a user: ``train`` then ``export`` then ``serve``, and a
demo that runs all of it. That is this package, and it is the only one that imports training, export and serving
together; nothing in the three imports it back.

- :mod:`promptclip.cli`: the command line (``python -m promptclip`` or the ``promptclip`` script). Its parsers need
  only the standard library and each command group's handlers are imported on demand, so ``serve`` and ``classify``
  run on a serving host without torch.
- :mod:`promptclip.server`: how a ``bentoml serve`` process on a bundle is started (``serve`` and the demo).
- :mod:`promptclip.demo`: data -> train -> export -> serve -> classify -> add a class, offline.
"""
