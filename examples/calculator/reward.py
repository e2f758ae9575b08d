"""The example's reward, in verl's signature: 1.0 when the last <answer> of the episode is the right number.

tracerl calls it at the end of every episode (`env.reward`) with the episode's text after the prompt as
`solution_str` (every turn, with the calculator's results between them) and the dataset's answer column as
`ground_truth`. It raises on nothing it should score as 0; if it did, tracerl would count the failure
(reward 0, `reward_errors` in the step metrics) and go on.
"""

import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    answers = ANSWER.findall(solution_str)
    if not answers:
        return 0.0
    try:
        return float(abs(float(answers[-1].strip()) - float(ground_truth)) < 1e-6)
    except ValueError:  # not a number
        return 0.0
