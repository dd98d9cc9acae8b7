"""Helpers shared by the tests (``tests/``) and the benchmarks (``bench/``): generated
images and the tree checker, real daemons run on loopback (docker-registry, containerd),
the fault-injecting proxy, and waiting with a deadline.

Both import from here and never from each other's helpers, so a benchmark does not depend
on the test suite, nor a test on a benchmark's modules (a test of a benchmark's quick mode
imports that benchmark, which is what it tests). Nothing here imports ``tests`` or
``bench``. Not shipped: like ``tests`` and ``bench`` it is imported from the tree's root
(pytest's ``tests/conftest.py`` and each bench script put the root on ``sys.path``).
"""
