"""Tasks written by tests against the bring-your-own-model API (``--task module:function``)."""
