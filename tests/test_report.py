"""The interactive report in a real headless browser (Debian's chromium through Selenium): the page loads
offline with no console error, the maps render, a hover shows a known cell's numbers and a click lists that
cell's strongest pairs with their texts."""

import os
import shutil
from pathlib import Path

import pytest
import torch

import sketchfisher as sf
from tiny_models import generic_loss, make_batches, make_model

pytest.importorskip("plotly")
SCREENSHOT = Path(os.environ.get("SKETCHFISHER_SCREENSHOT", "/nonexistent/report.png"))  # docs/ keeps one


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    model = make_model("llama_gqa")
    ta, tb = make_batches(8, 2, seed=1), make_batches(6, 3, seed=2)
    res = sf.analyze(model, generic_loss, ta, tb, codec=sf.Factors(), units="all")
    texts_a = [f"task A sample {i} <script>alert(1)</script>" for i in range(res.n_a)]  # never run as markup
    texts_b = [f"task B sample {j}" for j in range(res.n_b)]
    path = res.report(tmp_path_factory.mktemp("r") / "report.html", texts_a=texts_a, texts_b=texts_b, top=5)
    return res, path, texts_a, texts_b


def test_report_is_one_offline_file_with_every_family(report):
    res, path, _, _ = report
    page = path.read_text()
    assert "<script src=" not in page and "Plotly" in page  # plotly's JavaScript is inside the file
    for family in res.families:
        assert f"id='pairs-{family}'" in page and f'id="map-{family}"' in page
    assert "<script>alert(1)</script>" not in page  # texts are JSON in a data element, shown as text


def test_top_pairs_per_cell_are_the_cells_strongest(report):
    from sketchfisher.report import top_pairs_per_cell

    res = report[0]
    cells = top_pairs_per_cell(res, 3)
    names = res.layout.block_names
    (layer, b, head), pairs = next(iter(cells.items()))
    scores = res.scores[:, :, layer, head, b]
    want = torch.topk(scores.flatten(), 3).values  # paper: larger is a stronger conflict
    torch.testing.assert_close(torch.tensor([p[2] for p in pairs], dtype=want.dtype), want)
    i, j = pairs[0][:2]
    assert float(scores[i, j]) == pytest.approx(pairs[0][2]) and names[b] in names


def _browser():
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them in CI)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def test_report_in_a_headless_browser_hover_and_click(report, tmp_path):
    res, path, texts_a, _ = report
    table = res.head_conflicts()
    row = table[table["T"].notna()].iloc[0]  # a known cell: its first unit
    layer, head, block = int(row["layer"]), int(row["head"]), row["block"]
    col = list(res.layout.block_names).index(block)
    driver = _browser()
    try:
        driver.get(path.as_uri())
        driver.implicitly_wait(10)
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(driver, 30)  # a loaded machine: wait for the plot, never for a fixed time
        wait.until(lambda d: d.execute_script("var gd = document.getElementById('map-heads');"
                                              "return !!(gd && gd._fullLayout && gd._fullLayout.xaxis)"))
        gd = "document.getElementById('map-heads')"
        assert driver.execute_script(f"return {gd}.data.length") == 2 * len(res.layout.block_names)
        assert driver.execute_script(f"return {gd}.querySelectorAll('.hm, canvas, .heatmaplayer').length") > 0
        trace = 2 * col  # each block: its heatmap, then its conflict markers
        driver.execute_script(f"var gd = {gd}; var t = gd._fullData[{trace}];"  # the pointer over (head, layer)
                              f"Plotly.Fx.hover(gd, {{xval: {head}, yval: {layer}}}, t.xaxis + t.yaxis)")
        hover = driver.execute_script(f"var t = {gd}.querySelector('.hovertext'); return t ? t.textContent : ''")
        assert f"layer {layer} head {head} {block}" in hover
        assert f"alignment {row['alignment']:+.3f}" in hover and f"q {row['q_value']:.3g}" in hover
        # a real click on the cell: its centre in page pixels, from the subplot's axes
        x, y, w, h = driver.execute_script(
            f"var gd = {gd}, t = gd._fullData[{trace}], L = gd._fullLayout;"
            "var xa = L[t.xaxis.replace('x', 'xaxis')], ya = L[t.yaxis.replace('y', 'yaxis')];"
            f"return [xa._offset + xa.l2p({head}), ya._offset + ya.l2p({layer}), gd.offsetWidth, gd.offsetHeight]")
        from selenium.webdriver.common.action_chains import ActionChains

        element = driver.find_element("id", "map-heads")
        ActionChains(driver).move_to_element_with_offset(element, int(x - w / 2), int(y - h / 2)).pause(0.3).click().perform()
        wait.until(lambda d: "strongest pairs" in d.find_element("id", "cell-heads").text
                   and "Click a cell" not in d.find_element("id", "cell-heads").text)
        shown = driver.find_element("id", "cell-heads").text
        from sketchfisher.report import top_pairs_per_cell

        pairs = top_pairs_per_cell(res.units("heads"), 5)[(layer, col, head)]
        i, j, score, _ = pairs[0]
        assert f"layer {layer}, head {head}, block {block}" in shown
        assert texts_a[i] in shown and f"{score:.4g}" in shown
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        driver.save_screenshot(str(SCREENSHOT if SCREENSHOT.parent.exists() else tmp_path / "report.png"))
    finally:
        driver.quit()
