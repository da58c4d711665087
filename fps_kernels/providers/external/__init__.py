"""The `external` provider: kernels started elsewhere, served from their connection files
(`provider`), and the watcher of the folder those files are put in (`watcher`)."""
