"""Integrations with other frameworks; installed as ``featup_adapters.integrations``.

From a clone this folder is also importable as ``integrations`` (the repository root on
``sys.path``), which is how ``integrations/detectron2/train_net.py`` and the tests use it there.
"""
