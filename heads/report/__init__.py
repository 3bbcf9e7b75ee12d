"""Reports from the results database: `build` writes the report folder (tables, figures, the compute
profile, the paper comparison); `tables` lays runs out as the paper's tables, `figures` draws them,
`tsne` retrains a run to show its head's features, `profile` is Table S5, `paper` the published values,
`run_listing` the runs one by one (`iqa results --runs`)."""
