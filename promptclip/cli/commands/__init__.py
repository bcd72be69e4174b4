"""The handlers of the command groups, one module each, importing what they need at module level.

:func:`promptclip.cli.run_handler` imports one of these modules when one of its commands runs, so ``serve`` and
``classify`` (:mod:`.serve`, torch-free) never load the torch-side groups.
"""
