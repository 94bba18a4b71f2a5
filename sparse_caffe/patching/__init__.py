"""The patching side: the data model (config), the pinned source, rendering the templates into
the patch series, the keyed build, and the cache they share."""
