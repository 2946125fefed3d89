"""The network floor: the MQTT client factory and local brokers (Mosquitto, amqtt).

The only package that talks to a broker or starts one; it imports the core (``fedmq``)
and nothing above it.
"""
