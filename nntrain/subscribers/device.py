"""Device placement: `DeviceS` puts the model, the optimizer state and each batch on one device.

It lives in `nntrain.devices`, because the learner attaches one itself when it trains on the GPU
by default (`Learner(device="auto")`); it is exported here with the other subscribers."""

from nntrain.devices import DeviceS, default_device, to_device

__all__ = ["DeviceS", "default_device", "to_device"]
