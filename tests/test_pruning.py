"""The default pruner of unfrozen searches: successive halving, which judges a trial by the same rule whatever its
study is named; a study begun under hyperband keeps it."""

import optuna
from optuna.trial import TrialState
from test_studies import PlantedTrainer

from probing.studies.search import (
    SearchRequest,
    TrialFitter,
    create_study,
    pruner_of,
    run_trials,
    study_pruner,
)
from probing.tasks.search_space import SearchSpace


def planted_request(tmp_path, **changes) -> SearchRequest:
    trainer = PlantedTrainer()
    fields = dict(
        task="vsr",
        mode="unfrozen",
        model="unused",
        layer=1,
        out=tmp_path / "s",
        settings=trainer.settings,
        space=SearchSpace(lr=(1e-6, 1e-1), epochs=(9,)),
        trials=12,
        batch=1,
        seed=0,
        study_name="a",
        storage="journal:" + str(tmp_path / "study.log"),
    )
    return SearchRequest(**fields | changes)


def pruned_epochs(request: SearchRequest) -> tuple[list[int], float, int]:
    """(epochs each trial trained, best value, epochs in all) of a search on the planted trainer."""
    trainer = PlantedTrainer()
    study = create_study(request)
    run_trials(study, request, TrialFitter(trainer))
    return [len(t.intermediate_values) for t in study.trials], study.best_value, trainer.epochs


def test_auto_prunes_unfrozen_searches_by_successive_halving(tmp_path):
    request = planted_request(tmp_path)
    assert request.pruner_for("unfrozen") == "successive-halving" and request.pruner_for("frozen") == "none"
    pruner = pruner_of(request)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    epochs, best, total = pruned_epochs(request)
    assert len(epochs) == 12 and total == sum(epochs) < 12 * 9 / 2  # more than half the epochs saved
    assert set(epochs) <= {1, 4, 9}  # stopped at a rung (epochs 1 and 4) or run to the end
    assert best > 0.85  # the planted rule is still found


def test_successive_halving_judges_the_same_whatever_the_study_is_named(tmp_path):
    """Hyperband deals trials to brackets by a hash of the study's name: the same search prunes differently under
    another name. Successive halving has one bracket."""
    runs = {}
    for pruner in ("successive-halving", "hyperband"):
        for name in ("a", "another name"):
            folder = tmp_path / f"{pruner}-{name}"
            request = planted_request(folder, pruner=pruner, study_name=name)
            runs[pruner, name] = pruned_epochs(request)
    assert runs["successive-halving", "a"] == runs["successive-halving", "another name"]
    assert runs["hyperband", "a"][0] != runs["hyperband", "another name"][0]


def test_a_study_begun_under_hyperband_resumes_under_it(tmp_path):
    """Searches begun when `auto` meant hyperband keep it for their remaining trials, and say so."""
    request = planted_request(tmp_path, trials=4)
    storage = "journal:" + str(tmp_path / "study.log")
    old = optuna.create_study(
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage.removeprefix("journal:"))
        ),
        study_name="a",
        direction="maximize",
    )
    old.set_user_attr("pruner", "hyperband")
    study = create_study(request)
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner) and study_pruner(study, request) == "hyperband"
    run_trials(study, request, TrialFitter(PlantedTrainer()))
    states = {t.state for t in study.trials}
    assert states <= {TrialState.COMPLETE, TrialState.PRUNED} and len(study.trials) == 4
    chosen = planted_request(tmp_path, trials=4, pruner="successive-halving")  # given: what is asked is used
    assert study_pruner(study, chosen) == "successive-halving"
