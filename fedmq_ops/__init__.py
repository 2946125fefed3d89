"""Operator tools, the top floor: the ``fedmq`` command, the demo and experiment runner
(a local fleet of processes), fleet status, reports, enrolment and broker provisioning.

Imports the services (``aggregator``, ``edge_agent``), the network floor (``fedmq.net``)
and the core (``fedmq``); nothing imports it.
"""
