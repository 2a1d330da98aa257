"""The pilots: one package per published method family (``aalr``, ``mi_decay``, ``hypergradient``,
``lipschitz``, ``hyperreg``), each with its algorithm files and a ``register.py`` of registry records, and
the safety net (``safety_net.py``), a wrapper any method can compose. "Pilot" means any object that sets
the LR while a network trains: a :class:`~lrpilot.core.contract.Pilot` driven by the loop (epoch level)
or a ``torch.optim.Optimizer`` that sets its own LR inside ``step()`` (step level). The contract lives
in :mod:`lrpilot.core.contract`."""
