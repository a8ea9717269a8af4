"""The qatflow pipeline (``qat_int8``), what runs and compiles it (``runner``), and the
``qatflow`` commands that do so (``cli``, registered through the ``qatflow.commands`` entry
points). Everything here sits above the library: ``qatflow`` never imports this package."""
