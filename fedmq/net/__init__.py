"""The network floor: the MQTT client factory, local servers (Mosquitto, amqtt, Redis) and
the one process-stop helper (``procs``).

The only package that talks to a broker or starts one; it imports the core (``fedmq``)
and nothing above it.
"""
