"""Batch scoring and retrieval on the cluster engines recommender teams already run: Ray Data and Spark.

    from dmrx.integrations import ray as dmrx_ray        # pip install "dmrx[ray]"
    scored = dmrx_ray.score(ray.data.read_parquet("cands/"), model="/models/runs/best")

    from dmrx.integrations import spark as dmrx_spark    # pip install "dmrx[spark]"
    scored = dmrx_spark.score(spark.read.parquet("cands/"), model="/models/runs/best")
    top = dmrx_spark.recommend(users_df, run="/models/runs/best", k=50)

Both take the Parquet/Arrow candidate layout of `dmrx.data.arrow` (`dmrx data parquet` writes it; `dmrx
score` reads it too) and return the data with a `score` column (retrieval: `items` and `scores` list
columns). On the driver, before the job fans out, the model (or index) is loaded once and the columns are
checked against it, so a missing column, a wrong type or a model that cannot load is one DmrxError there.
Each Ray actor or Spark Python worker then loads the model once (dmrx.integrations.common) and scores its
batches with `Scorer`, so candidates of one user in a batch share one history encoding. docs/scoring.md
says what a real cluster needs (what to install on workers, where the model files go).
"""
