"""DANN: Ganin et al., "Domain-adversarial training of neural networks", JMLR 2016: one domain discriminator on the
fused video feature (the streams' features concatenated) behind a gradient reversal layer, its coefficient
``2 / (1 + exp(-10 p)) - 1`` (sec. 5.2.2), on the dataset's schedule (MM-SADA's two stages on D1/D2/D3: the
reversal from the start of stage 2)."""

from adapt.methods.base import Method, facts

METHOD = Method(
    name="dann",
    title="DANN, Ganin et al. 2016",
    citation="Y. Ganin et al. Domain-Adversarial Training of Neural Networks. JMLR 2016.",
    composition="GRL + one discriminator on the concatenated video features",
    facts=facts(
        ("w_video_adv", 1.0, "DANN eq. 9 (lambda weighs the reversed gradient; the loss enters with 1)"),
        ("beta_video", 1.0, "DANN sec. 5.2.2 (lambda from 0 to 1)"),
        ("grl_gamma", 10.0, "DANN sec. 5.2.2 (gamma = 10)"),
    ),
)
