"""The benchmark scripts; installed as ``featup_adapters.benchmarks`` so that
``featup-adapters bench`` runs from an installed package.  In a clone, run them directly:
``python benchmarks/adaptive_conv.py --quick``, ``python benchmarks/jbu.py --quick``.
"""
