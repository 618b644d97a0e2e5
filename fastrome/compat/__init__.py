"""Drop-in interfaces of other model-editing libraries, on fastrome (``fastrome.compat.easyedit``)."""
