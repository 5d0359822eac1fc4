"""The fixed prose of the memo: methodology with formulas, verdict rules, limits, threshold meanings.

Kept apart from ``render.memo`` (which lays out numbers) so the HTML and the Markdown
memo say exactly the same words, and so docs/methodology.md can be checked against
them. Plain text only: the memo escapes and formats it for each output.
"""

from __future__ import annotations

#: (metric, plain words, formula): B = base tensor, T = tuned tensor, D = T - B, s1 >= s2 >= ... singular values of D
METRICS = [
    ("relative change", "How large the change is compared with the weights it changed: 0.01 means the change is "
     "1% of the size of the original matrix.", "rel_change = ‖D‖ / ‖B‖   (Frobenius norms: square root of the sum of "
     "squared entries)"),
    ("1 − cosine", "How far the tuned matrix has turned away from the base matrix, read as a direction. 0 means the "
     "same direction; independently trained models give about 1. Reported in scientific notation because a small "
     "fine-tune gives values such as 1e-5.", "1 − cos = 1 − ⟨B, T⟩ / (‖B‖ ‖T‖) = (‖D‖² − (‖B‖ − ‖T‖)²) / (2 ‖B‖ ‖T‖)"),
    ("share of parameters unchanged", "The share of the tuned model's numbers that are bit for bit the same as in "
     "the base, counted number by number (a merge that left most numbers of every matrix alone counts them); "
     "the share in tensors left entirely unchanged is given beside it when it differs.",
     "unchanged = Σ #{(i, j): T_ij == B_ij bitwise} / Σ numel(all tuned tensors)"),
    ("rounding only", "A tensor whose every difference is smaller than half a step of the coarser storage format "
     "(for example float32 saved as bfloat16): the change a format conversion alone explains.",
     "|D_ij| ≤ ½ ulp(B_ij) in the coarser dtype, for every element"),
    ("stable rank", "How many directions the change effectively uses, dominated by its strongest one; never more "
     "than the true rank.", "stable_rank = ‖D‖² / s1²"),
    ("energy rank (90%, 99%)", "The number of independent directions needed to write down 90% (99%) of the change. "
     "A rank-8 LoRA update has energy rank at most 8; a full fine-tune of a 4096-wide matrix typically needs 1,000 "
     "or more (Biderman et al. 2024).", "energy_rank_p = smallest k with s1² + ... + sk² ≥ p · ‖D‖²"),
    ("effective rank", "The exponential of the entropy of the normalised singular values (Roy and Vetterli 2007). "
     "It counts faint directions too, so storage rounding inflates it; verdicts never rest on it alone.",
     "effective_rank = exp(−Σ p_i ln p_i),  p_i = s_i / Σ s_j"),
    ("noise floor and numerical rank", "Saving weights in a 16-bit format adds rounding noise to every entry; "
     "its largest singular value is predictable (the Marchenko-Pastur edge; Bandeira and van Handel 2016 for uneven magnitudes). Directions clearly above it are "
     "counted as the numerical rank: a rank-8 update merged and saved in bfloat16 reads 8.",
     "noise_floor ≈ √(max_i Σ_j v_ij) + √(max_j Σ_i v_ij),  v_ij = ulp(x_ij)² / 12 (= σ(√m + √n) for even "
     "magnitudes);   numerical_rank = #{i : s_i > noise_floor_factor · noise_floor}"),
    ("delta parameters", "How many numbers it takes to write the change down: a low-rank matrix needs only its "
     "factors, added tensors count whole. This is the headline measure of how much was injected.",
     "delta_params = Σ over changed matrices min(m·n, r99·(m + n), 2·changed elements) + Σ changed vectors + Σ added elements"),
    ("model relative change", "The relative change over the whole model, every paired tensor weighted by its "
     "size.", "relative_change = √(Σ ‖D‖²) / √(Σ ‖B‖²)"),
]

SPECTRUM_NOTE = ("Singular values come from an exact SVD for matrices whose smaller side is at most "
                 "exact_svd_max, and from a seeded randomized SVD (Halko, Martinsson and Tropp 2011) above it; "
                 "the share of ‖D‖² the reported top singular values capture is checked against ‖D‖², which the "
                 "streaming pass measures exactly, and reported. A LoRA adapter's change (scale · B·A; PEFT's, on modules or "
                 "on fused experts' parameters, a llama.cpp GGUF's or mlx-lm's) is analysed exactly from its factors, and so are AdaLoRA's, LoHa's, LoKr's, VeRA's, VBLoRA's, FourierFT's, DeLoRA's and "
                 "HRA's, whose changes are products of such factors (HRA's W · (H − I), H its Householder reflections), and PEFT's trainable tokens from the rows they replace (a change of as many "
                 "rows); an IA3, OFT or BOFT adapter's as the weights PEFT merges (W · l, W · Rᵀ, (W · Mᵀ) · s), against the base's, "
                 "and an LN tuning adapter's trained layer copies as the tensors they replace.")
COUNT_NOTE = ("This comparison was run with --spectrum count: for the matrices whose rank was read from their "
              "Gram matrix DᵀD, numerical_rank is a certified count of the singular values above the threshold "
              "(Sylvester's law of inertia: the signs of the pivots of two LDL^T factorizations of DᵀD − τ²·I, "
              "with τ moved by the computation's error bound each way; a count that is not pinned down is shown "
              "as a range), and their other rank numbers come from the top singular values, shown as bounds or "
              "estimates.")

VERDICTS = [
    ("inconclusive", "nothing has a compared counterpart, or on both sides less than min_coverage of the large "
     "matrices (at least large_matrix_numel elements) was compared: what happened to pair is not the model; "
     "or, nothing else having changed, quantized tensors whose format gives no noise floor to test differ "
     "from the base, so quantization alone cannot be told from a fine-tune."),
    ("partial", "otherwise, judged per component (input embeddings, each block, the head), some components are "
     "unrelated to the base and others shared with it, as when a model keeps another's embeddings around new "
     "blocks. A pooled cosine dominated by one component never decides alone. A component whose cosine is from "
     "independent_cosine up to unrelated_cosine keeps a faint trace of the base and is not counted as unrelated."),
    ("unrelated", "otherwise, every measured component is unrelated, or (none shared) the large matrices (norm "
     "gains and biases left out) are near-orthogonal: their size-weighted cosine is below unrelated_cosine and "
     "their relative change above unrelated_rel_change, as for two independently initialised models (cosine "
     "about 0, relative change about √2). A cosine from independent_cosine up to unrelated_cosine is a faint "
     "trace of the base, more than independent models share: inconclusive."),
    ("identical", "otherwise, when every effective parameter is bitwise equal (a tied head counts as the "
     "embedding it is) and none was added, removed or resized."),
    ("cast_only", "otherwise, when no tensor changed beyond the rounding of a dtype cast (at most rounding_frac "
     "of a tensor's elements beyond half an ulp, or every value bitwise a cast of the base through another "
     "format or past the range) and none was added, removed or resized."),
    ("quantized_only", "otherwise, when every tensor with a quantized side lies within its own quantization noise "
     "floor, every other tensor is unchanged or within rounding, and none was added, removed or resized."),
    ("derived", "everything else: the tuned model is a modification of this base. Its scope (blocks and tensors "
     "changed) and form are reported next to it."),
]

FORMS = [
    ("low_rank", "every changed matrix has a spectrum, and for each min(energy_rank_99, numerical_rank) ≤ "
     "low_rank_share · 2mn/(m + n) (a tenth of a square matrix's side; the factors of such a change take at most "
     "twice low_rank_share of the matrix's parameters) and numerical_rank ≤ low_rank_max: the kind of change "
     "LoRA-style training (Hu et al. 2021) leaves."),
    ("sparse", "otherwise, when the elements that changed beyond rounding are at most sparse_frac of the changed "
     "tensors' elements."),
    ("vectors", "otherwise, when no matrix changed, only vectors (norm weights, biases: LayerNorm tuning, "
     "BitFit): a vector has no directions, so the change is neither low-rank nor spread over many."),
    ("undecided", "otherwise, when matrices whose rank cannot decide the low-rank rule (a bracket that is "
     "low-rank at its lower end but not at its upper end, no direction above the modelled quantization "
     "noise, a side quantized with error compensation (GPTQ) whose counted directions may be the "
     "compensation's, or no rank analysis at all: --no-rank, or a change none is taken of, as NaN or infinity in it) hold at least mixed_min_share of the changed matrices' parameters, or any do and the certainly "
     "dense ones hold less."),
    ("mixed", "otherwise, when low-rank matrices hold at least mixed_min_share of the changed matrices' "
     "parameters and the others the rest, however small (both shares are reported)."),
    ("dense", "otherwise: the change spreads over many directions, as full fine-tuning does."),
]

THRESHOLD_MEANING = {
    "rounding_frac": "largest share of a tensor's elements beyond rounding that still counts as rounding only",
    "unrelated_cosine": "size-weighted cosine of large matrices below which the models may be unrelated ...",
    "unrelated_rel_change": "... and relative change of those matrices above which they are (independent inits: ~1.41)",
    "independent_cosine": "... and cosine below which they are; from it up to unrelated_cosine the matrices keep a "
                          "faint trace of the base (inconclusive)",
    "large_matrix_numel": "elements a matrix needs to count as evidence of relatedness",
    "noise_floor_factor": "a singular value counts toward numerical rank above this multiple of the noise floor",
    "low_rank_share": "form is low_rank when min(energy_rank_99, numerical_rank) is at most this share of 2mn/(m + n) ...",
    "low_rank_max": "... and numerical rank at most this",
    "sparse_frac": "form is sparse when elements changed beyond rounding are at most this share of the changed tensors",
    "mixed_min_share": "form is mixed when low-rank matrices hold at least this share of the changed matrices' "
                       "parameters and others the rest; undecided when matrices of undecided rank hold this share",
    "min_coverage": "inconclusive when less than this share of the large matrices was compared on both sides",
}

SHOWS = [
    "Which tensors, blocks and module kinds of the tuned checkpoint differ from the base, and by how much.",
    "How the change is shaped: how many independent directions it needs (its rank), and how many numbers it "
    "takes to write it down.",
    "Whether the tuned weights are plausibly a modification of this base at all (the verdict).",
]

DOES_NOT_SHOW = [
    "These numbers describe weights only. They say nothing about the data a model was trained on, what it "
    "learned, how it behaves, or how well it performs: a small weight change can change behaviour a lot, and a "
    "large one can change it little.",
    "They are not a statement about licences, copyright, authorship or any other legal status, and this memo "
    "draws no legal conclusion. Whether a change is 'substantial' in a legal or policy sense is a judgement "
    "these numbers can inform, not settle.",
    "A 'derived' verdict means the weights are close to this base; it does not identify who made the change or "
    "exclude that both models descend from a common ancestor. An 'unrelated' verdict concerns this base only.",
    "A low-rank form says the change can be written compactly, not that LoRA was used; full fine-tuning with a "
    "small learning rate can also look low-rank, and a merged adapter looks the same as any other low-rank edit.",
    "Relative change, energy ranks and parameter shares depend on the storage format: values near the noise "
    "floor of the dtype are not evidence of training.",
]

#: flag -> (a plain-words line on the transformation found, the sources it names); the memo's method section
#: gives one for each flag that fired, since the verdict uses these words ("residual stream", "folded") and the
#: tester found none of them defined or cited anywhere in the memo
TRANSFORMS = {
    "permuted_units": ("Units reordered: the neurons of an MLP, the heads of an attention module, the experts of a "
                       "mixture-of-experts layer or the token rows of the embedding and head tables can be put in "
                       "another order, the matrices that read them following, without changing what the model "
                       "computes (a token table only when the embedding and the head follow one order, a tokenizer's "
                       "ids remapped).",
                       ["S. Ainsworth, J. Hayase and S. Srinivasa, 'Git Re-Basin: Merging Models modulo Permutation "
                        "Symmetries', ICLR 2023 (arXiv:2209.04836)."]),
    "rescaled_units": ("Units rescaled: a unit's row times a factor and the column that reads it divided by the same "
                       "factor leaves what a gated MLP or attention's v and o compute unchanged; a factor of -1 flips "
                       "the unit's sign.", []),
    "negated_matrices": ("Signs flipped: a matrix stored times -1; what the model computes is unchanged only when the "
                         "matrix that reads its output is flipped too.", []),
    "folded_norms": ("Norm gains folded: a normalization layer's per-channel gains multiplied into the columns of the "
                     "matrices that read it (the norm then all ones, or divided by smoothing scales), which leaves what "
                     "the model computes unchanged; QuaRot and SpinQuant do it before rotating, SmoothQuant before "
                     "quantizing.",
                     ["G. Xiao et al., 'SmoothQuant: Accurate and Efficient Post-Training Quantization for Large "
                      "Language Models', ICML 2023 (arXiv:2211.10438)."]),
    "rotated_residual": ("Residual stream rotated: the residual stream is the vector each layer reads and adds to; "
                         "multiplying it by one orthogonal matrix, the matrices that write it and read it following "
                         "(with the norms' gains folded first), changes every stored matrix but not what the model "
                         "computes. QuaRot and SpinQuant do this before quantizing.",
                         ["S. Ashkboos et al., 'QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs', NeurIPS 2024 "
                          "(arXiv:2404.00456).",
                          "Z. Liu et al., 'SpinQuant: LLM Quantization with Learned Rotations', ICLR 2025 "
                          "(arXiv:2405.16406)."]),
    "pruned_elements": ("Pruned: elements of a matrix set to exactly zero and every other element left the base's "
                        "(magnitude pruning, 2:4 sparsity, heads zeroed), as SparseGPT and Wanda do without "
                        "retraining.",
                        ["E. Frantar and D. Alistarh, 'SparseGPT: Massive Language Models Can Be Accurately Pruned in "
                         "One-Shot', ICML 2023 (arXiv:2301.00774).",
                         "M. Sun et al., 'A Simple and Effective Pruning Approach for Large Language Models', ICLR "
                         "2024 (arXiv:2306.11695)."]),
}

SOURCES = [
    "O. Roy and M. Vetterli, 'The effective rank: a measure of effective dimensionality', EUSIPCO 2007.",
    "M. Rudelson and R. Vershynin, 'Sampling from large matrices: an approach through geometric functional "
    "analysis', J. ACM 54(4), 2007 (stable rank).",
    "N. Halko, P.-G. Martinsson and J. A. Tropp, 'Finding structure with randomness: probabilistic algorithms "
    "for constructing approximate matrix decompositions', SIAM Review 53(2), 2011.",
    "A. S. Bandeira and R. van Handel, 'Sharp nonasymptotic bounds on the norm of random matrices with "
    "independent entries', Annals of Probability 44(4), 2016 (the noise floor).",
    "E. J. Hu et al., 'LoRA: Low-Rank Adaptation of Large Language Models', ICLR 2022 (arXiv:2106.09685).",
    "D. Biderman et al., 'LoRA Learns Less and Forgets Less', TMLR 2024 (arXiv:2405.09673).",
    "J. Liu et al., 'BitDelta: Your Fine-Tune May Only Be Worth One Bit', NeurIPS 2024 (arXiv:2402.10193).",
]
