"""The ground floor both stages stand on: the feature store and everything that names its inputs.

* :mod:`featstore.store`: the store format (Zarr v3), its reader, writer and compatibility check;
  :mod:`featstore.schema`: its version, arrays and attributes (:class:`~featstore.schema.StoreAttrs`);
  :mod:`featstore.integrity`: the chunk check and repair; :mod:`featstore.convert`: version 1 -> 2;
* :mod:`featstore.manifests`: split manifests, the split registry, domains; :mod:`featstore.paths`: where a
  split's store lives (``features/<backbone>/<split>.zarr``) and how a name resolves to a store;
* :mod:`featstore.errors`: :class:`UserError`, the one-line mistake both stages raise;
* :mod:`featstore.synthetic`: stores of synthetic features in the real format, for tests and benchmarks;
* :mod:`featstore.allocator`: the process-wide glibc setting both stages' loops use.

``extract`` writes stores and ``adapt`` reads them; both import this package and never each other.
"""
