// Pivotal's tab inside the A1111 webui: follow a training run with the webui's own progress bar
// and live preview (its requestProgress over /internal/progress), as its txt2img and Train tabs do.
// The run's task id is unique per run and only known once the run starts, so after a click on
// Start this asks Pivotal's status API for it, then hands it to requestProgress.
(function() {
    var POLL_MS = 500;
    var GIVE_UP_MS = 60000; // a run waits in the webui's queue meanwhile; the bar shows that too

    function fetchStatus(done) {
        var xhr = new XMLHttpRequest();
        xhr.open("GET", "./pivotal/v1/status", true);
        xhr.onreadystatechange = function() {
            if (xhr.readyState !== 4) return;
            var snap = null;
            if (xhr.status === 200) {
                try {
                    snap = JSON.parse(xhr.responseText);
                } catch (e) {
                    snap = null;
                }
            }
            done(snap);
        };
        xhr.send();
    }

    function followRun(previousTask, started) {
        fetchStatus(function(snap) {
            var task = snap && snap.webui_task;
            if (task && task !== previousTask) {
                var app = gradioApp();
                requestProgress(task, app.getElementById("pivotal-webui-progressbar"),
                    app.getElementById("pivotal-webui-preview"), function() {}, null);
                return;
            }
            if (Date.now() - started < GIVE_UP_MS) {
                setTimeout(function() {
                    followRun(previousTask, started);
                }, POLL_MS);
            }
        });
    }

    onUiLoaded(function() {
        if (typeof requestProgress !== "function") return; // not the webui's page
        var start = gradioApp().getElementById("pivotal-start");
        if (!start) return;
        start.addEventListener("click", function() {
            // the task id of a run already going (if any) is not ours to follow
            fetchStatus(function(snap) {
                followRun(snap && snap.webui_task || "", Date.now());
            });
        });
    });
})();
