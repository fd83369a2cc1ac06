"""5x preparation: each slide's tissue box read once at the training resolution and cached (``wsilocal prepare``)."""
