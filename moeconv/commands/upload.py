"""``moeconv upload``: publish a converted model on the Hugging Face Hub."""

from __future__ import annotations

import click


@click.command(
    "upload",
    epilog="""\b
The whole flow, from a Hub checkpoint to a Hub quantization:
  moeconv convert mistralai/Mixtral-8x7B-v0.1 ./mixtral-nf4      # routed experts NF4, routers BF16
  moeconv inspect ./mixtral-nf4                                  # schemes, bits and sizes
  moeconv eval ./mixtral-nf4 --text eval.txt                     # perplexity on your text
  moeconv upload ./mixtral-nf4 my-org/Mixtral-8x7B-moeconv-nf4   # verify, then one commit
or convert and upload in one go:
  moeconv convert mistralai/Mixtral-8x7B-v0.1 ./mixtral-nf4 --push-to-hub my-org/Mixtral-8x7B-moeconv-nf4
then load it from the Hub id anywhere (experts stay packed):
  import moeconv_torch, transformers
  model = transformers.AutoModelForCausalLM.from_pretrained("my-org/Mixtral-8x7B-moeconv-nf4")

\b
The token comes from HF_TOKEN or from `hf auth login`; HF_ENDPOINT selects
another Hub.  Nothing is sent if OUT fails verification.""",
)
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (an existing one keeps its visibility).")
@click.option("--revision", metavar="BRANCH", default=None, help="Commit to this branch, created from main if missing.")
@click.option("--commit-message", metavar="TEXT", default=None, help="Summary of the commit.")
def command(out: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None) -> None:
    """Verify the converted model OUT and upload it to the Hub as REPO_ID (namespace/name).

    OUT must be a complete conversion: every checksum is verified and the model
    card's front matter is validated before anything is sent.  The repository
    is created if it does not exist and every file goes up in a single commit
    (large files through LFS or Xet, as huggingface_hub decides).
    """
    from moeconv.hub import UploadError, upload_folder

    try:
        done = upload_folder(out, repo_id, private=private, revision=revision, commit_message=commit_message)
    except UploadError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"uploaded {len(done.files)} files to {done.repo_id}@{done.revision} in commit {done.commit_oid}")
    click.echo(done.commit_url)
