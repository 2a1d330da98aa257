"""The foundation every other layer builds on; it imports nothing above it.

* :mod:`~lrpilot.core.contract`: what a pilot is (``Pilot``, ``Decision``, the signals, ``MethodParts``);
* :mod:`~lrpilot.core.registry`: the method records and their lookup;
* :mod:`~lrpilot.core.families`: the one list of method families;
* :mod:`~lrpilot.core.rollback`: the one checkpoint-and-back-off mechanism pilots compose;
* :mod:`~lrpilot.core.checks`: the option validators every constructor uses;
* :mod:`~lrpilot.core.data`, :mod:`~lrpilot.core.seeding`, :mod:`~lrpilot.core.distributed`: in-memory
  data, random state and ``torch.distributed`` helpers;
* :mod:`~lrpilot.core.progress`: a bar on a terminal, a log line per trial otherwise, for long searches.
"""
