"""``mtool push``: thin Click wrapper over :mod:`mtool.publish.push`."""

from __future__ import annotations

import click


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--dry-run", is_flag=True, help="Check everything and print what would be uploaded and the card's "
                                              "metadata; send nothing.")
@click.option("--message", help="The commit message (default: Upload FOLDER with mtool).")
def push(folder: str, repo_id: str, private: bool, dry_run: bool, message: str | None) -> None:
    """Upload FOLDER to the Hugging Face Hub as REPO_ID (OWNER/NAME), once its card parses, its name follows the
    naming schema, its license is known and its card shows no local paths. The token is huggingface_hub's
    (HF_TOKEN or `hf auth login`); HF_ENDPOINT points at another Hub."""
    import yaml

    from mtool import ui
    from mtool.publish.push import plan_push
    from mtool.publish.push import push as upload

    plan = plan_push(folder, repo_id, private=private)
    if dry_run:
        click.echo(f"would upload {len(plan.files)} files ({plan.total_bytes / 1e6:,.1f} MB) to {plan.repo_id} "
                   f"({'private' if plan.private else 'public'} if created):")
        for file in plan.files:
            click.echo(f"  {file.size:>14,}  {file.path}")
        click.echo("card metadata:")
        click.echo("  " + yaml.safe_dump(plan.metadata, sort_keys=False, allow_unicode=True).rstrip()
                   .replace("\n", "\n  "))
    for note in plan.notes:
        ui.warn(note)
    if dry_run:
        return
    url = upload(plan, message=message)
    ui.info(f"uploaded {len(plan.files)} files ({plan.total_bytes / 1e6:,.1f} MB) to {plan.repo_id}")
    click.echo(url)
