"""Differential privacy, pure parts: clipping, Gaussian noise, adaptive clipping and the
accountant (a thin layer over Google's ``dp-accounting``, imported only when used, so
devices never need it). docs/privacy.md states the guarantees and what they rest on."""
