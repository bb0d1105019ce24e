"""A scripted pick-and-place expert for LIBERO that plans every step from the simulator's true poses.

`PickPlaceExpert.act(state)` takes `LiberoEnv.privileged_state()` and returns ONE 7-d action in the model's
convention (`LiberoEnv.step` takes it): arm deltas in LIBERO's OSC_POSE units scaled to [-1, 1] (1 = 5 cm of
position target, 1 = 0.5 rad of rotation, world frame), then the gripper g in {0, 1} with 1 = open. It solves
goals of one predicate, ('on', object, other object) as in LIBERO-Spatial and ('in', object, container
region) as in LIBERO-Object: rise to a height that clears everything on the way, move above the grasp, descend,
close, lift, carry the object (its own pose, not the hand's, is steered onto the target), lower, release, retreat.

It is closed-loop: the phase logic reads the state, so a dropped object, a missed grasp or a misplaced release
sends it back to the grasp, which is what makes the recoveries that `ActionNoise` (DART-style noise on the
EXECUTED action; the expert's clean action is what gets recorded) provokes.

Phases: approach (rise, cross, turn, descend) -> close -> carry (lift, cross, lower) -> release -> retreat -> idle;
recover (open, rise) leads back to approach, as does an idle object that is not where the goal wants it.

Grasps: an object narrower than the open gripper is taken across, at its middle or a little below its top; a
wider one (a bowl) by its rim. Among the candidate grasps (hand turned about the vertical, rim angle, shift off
the middle) it takes the one whose open hand and fingers clear every other body's box, then the least turn, the
least shift, the hand nearest the robot. A bowl sunk in a fixture (an open drawer) is taken along the fixture's
long interior axis. Only the yaw is steered (to the grasp's turn, 0 for most): the roll and pitch rotation values
stay 0, as the hand keeps its start orientation by itself (`hold_orientation` steers them too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlacache.config import ConfigError
from vlacache.envs.libero import Pose, PrivilegedState

POS_UNIT = 0.05  # metres of position target per unit of action (LIBERO's OSC_POSE output limit)
ROT_UNIT = 0.5  # radians per unit of action
OPEN, CLOSE = 1.0, 0.0  # the model's gripper convention
FINGER_SPAN = 0.07  # widest object the open fingers take across (pads ~7.6 cm apart)
FINGER_BELOW = 0.013  # fingertips below the grip site
# footprints around the grip site (across the fingers lo, hi, along the closing axis lo, hi), metres
HAND = np.array([-0.035, 0.04, -0.105, 0.105])  # the hand, from HAND_ABOVE up
HAND_ABOVE = 0.024
FINGER = np.array([-0.013, 0.013, 0.032, 0.068])  # one open finger (mirrored for the other), from FINGER_BELOW down


@dataclass
class ExpertConfig:
    """Gains, heights and timings of the scripted expert (metres, steps)."""

    pos_gain: float = 4.0  # arm action per POS_UNIT of position error
    rot_gain: float = 1.0  # rotation action per ROT_UNIT of orientation error
    hold_orientation: bool = False  # steer roll / pitch back to the start too (else only the yaw is steered)
    clearance: float = 0.03  # margin above obstacles while travelling
    rim_inset: float = 0.012  # rim grasps: grip site this far inside the rim
    container_inset: float = 0.022  # the same for a bowl inside a fixture (room for the outer finger)
    rim_depth: float = 0.022  # rim grasps: grip site this far below the rim
    place_gap: float = 0.01  # release with the object's bottom this far above its support
    xy_tol: float = 0.01  # close enough above a point to descend
    z_tol: float = 0.008
    yaw_tol: float = math.radians(6)
    close_steps: int = 14  # gripper closing (stops earlier once the fingers stall)
    open_steps: int = 8
    retreat: float = 0.08  # rise after the release
    phase_limit: int = 120  # steps in one phase before the expert starts over from the grasp


@dataclass
class NoiseConfig:
    """DART-style perturbations of the executed action (the recorded action stays the clean one).

    sigma: std of Gaussian noise on the 3 position values (model units: 1 = 5 cm of target), rot_sigma: on the
    3 rotation values; bursts: with probability `burst_prob` per step a push of `burst_scale` in a random
    direction for `burst_steps` steps (uniform in the range). Missed grasps: with probability `grasp_miss_prob`
    per grasp, the arm's executed translation is replaced for the first `grasp_miss_steps` steps of the close by a
    full-scale push up and sideways, so the fingers close on nothing and the expert's recovery (open, rise,
    approach again) is recorded. The gripper is never perturbed. All zero = off.
    """

    sigma: float = 0.0
    rot_sigma: float = 0.0
    burst_prob: float = 0.0
    burst_scale: float = 0.6
    burst_steps: tuple[int, int] = (3, 8)
    grasp_miss_prob: float = 0.0
    grasp_miss_steps: int = 8

    @property
    def active(self) -> bool:
        return self.sigma > 0 or self.rot_sigma > 0 or self.burst_prob > 0 or self.grasp_miss_prob > 0

    def check(self) -> "NoiseConfig":
        """Refuse, naming the key, probabilities outside [0, 1] and a missed grasp of no steps."""
        for key in ("burst_prob", "grasp_miss_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"noise.{key} is a probability in [0, 1], got {getattr(self, key)}")
        if self.grasp_miss_steps < 1:
            raise ConfigError(f"noise.grasp_miss_steps must be >= 1, got {self.grasp_miss_steps}")
        return self


class ActionNoise:
    """Applies `NoiseConfig` to clean expert actions; seeded, so an episode's noise is reproducible. `phase` is the
    expert's phase after choosing the action (`PickPlaceExpert.phase`): a missed grasp starts as a close begins."""

    def __init__(self, config: NoiseConfig, seed: int | list[int]) -> None:
        self.config = config
        self.rng = np.random.default_rng(seed)
        self._burst = np.zeros(3)
        self._burst_left = 0
        self._phase: str | None = None
        self._miss_left = 0
        self._miss = np.zeros(3)

    def __call__(self, action: np.ndarray, phase: str | None = None) -> np.ndarray:
        c = self.config
        out = np.array(action, dtype=np.float64)
        if not c.active:
            return out
        if phase == "close" and self._phase != "close" and c.grasp_miss_prob > 0 and self.rng.random() < c.grasp_miss_prob:
            angle = self.rng.uniform(0.0, 2 * math.pi)
            self._miss = np.array([0.5 * math.cos(angle), 0.5 * math.sin(angle), 1.0])
            self._miss_left = c.grasp_miss_steps
        self._phase = phase
        if self._miss_left > 0 and phase == "close":
            self._miss_left -= 1
            out[:3] = self._miss
            return out
        self._miss_left = 0
        if self._burst_left == 0 and c.burst_prob > 0 and self.rng.random() < c.burst_prob:
            direction = self.rng.normal(size=3)
            self._burst = c.burst_scale * direction / np.linalg.norm(direction)
            self._burst_left = int(self.rng.integers(c.burst_steps[0], c.burst_steps[1] + 1))
        if self._burst_left > 0:
            out[:3] += self._burst
            self._burst_left -= 1
        out[:3] += self.rng.normal(scale=c.sigma, size=3) if c.sigma > 0 else 0.0
        out[3:6] += self.rng.normal(scale=c.rot_sigma, size=3) if c.rot_sigma > 0 else 0.0
        out[:6] = np.clip(out[:6], -1.0, 1.0)
        return out


@dataclass
class _Grasp:
    local: np.ndarray  # the grip site's goal in the object's frame (follows the object if it moves or tilts)
    yaw: float  # hand turn about the world vertical


class PickPlaceExpert:
    """Scripted expert for one-predicate pick-and-place goals ('on' / 'in'); call `reset()` per episode."""

    def __init__(self, config: ExpertConfig | None = None) -> None:
        self.config = config or ExpertConfig()
        self.reset()

    def reset(self) -> None:
        """Forget the episode (phase, grasp, start orientation)."""
        self.phase = "approach"
        self.phase_steps = 0
        self.recoveries = 0
        self._rot0: np.ndarray | None = None
        self._grasp: _Grasp | None = None
        self._turn = 0.0  # the hand's yaw goal (that of the latest grasp)
        self._hold: np.ndarray | None = None  # where the hand stays while the gripper moves
        self._grip_distance = 0.0  # distance from the grip site to the held object's origin, at the grasp
        self._last_opening: list[float] = []
        self._trail: list[np.ndarray] = []
        self._over = False  # above the current goal (descent allowed)

    # -- the step -----------------------------------------------------------------------------------------
    def act(self, s: PrivilegedState) -> np.ndarray:
        """The clean expert action (float32 [7], model convention) for this state."""
        if len(s.goal) != 1 or s.goal[0][0] not in ("on", "in"):
            raise ValueError(f"PickPlaceExpert solves one 'on' / 'in' goal, this task asks {s.goal}")
        if self._rot0 is None:
            self._rot0 = _quat2mat(s.eef_quat)
        self._trail = (self._trail + [s.eef_pos.copy()])[-6:]
        self._last_opening = (self._last_opening + [s.gripper_opening])[-4:]
        self.phase_steps += 1
        if self.phase_steps > self.config.phase_limit and self.phase not in ("idle", "recover"):
            self._enter("recover")
        for _ in range(3):  # a phase may hand over to the next within the same step
            before = self.phase
            target, gripper = getattr(self, f"_{self.phase}")(s)
            if self.phase == before:
                break
        return self._action(s, target, gripper)

    def _enter(self, phase: str) -> None:
        self.phase, self.phase_steps, self._over = phase, 0, False
        if phase in ("close", "release", "recover"):
            self._hold = None
        if phase == "recover":
            self.recoveries += 1

    # -- phases -------------------------------------------------------------------------------------------
    def _approach(self, s: PrivilegedState):
        """Over the grasp at a height that clears the way, turn the hand, descend; close when there."""
        obj, _, _ = self._parts(s)
        if self._grasp is None:
            self._grasp = self._choose_grasp(s)
            self._turn = self._grasp.yaw
        g = self._grasp
        goal = obj.pos + _quat2mat(obj.quat) @ g.local
        # the object itself counts: the fingers come down over it
        travel = self._corridor_top(s, s.eef_pos[:2], goal[:2], skip=set()) + self.config.clearance + FINGER_BELOW
        turned = abs(_wrap(self._yaw(s) - g.yaw)) < self.config.yaw_tol
        target = self._route(s, goal, travel, may_descend=turned)
        blocked_low = self._stalled() and self._near_xy(s, goal, 0.015) and s.eef_pos[2] < goal[2] + 0.03
        if self._arrived(s, goal) or blocked_low:
            self._enter("close")
        return target, OPEN

    def _close(self, s: PrivilegedState):
        """Hold still while the fingers close (until they stall or close_steps)."""
        if self._hold is None:
            self._hold = s.eef_pos.copy()
        opening = self._last_opening
        stalled = self.phase_steps > 6 and len(opening) >= 3 and abs(opening[-3] - opening[-1]) < 0.0008
        if self.phase_steps >= self.config.close_steps or stalled:
            obj, _, _ = self._parts(s)
            self._grip_distance = float(np.linalg.norm(obj.pos - s.eef_pos))
            self._enter("carry")
        return self._hold, CLOSE

    def _carry(self, s: PrivilegedState):
        """Lift, carry the object's own position over the target, lower it; recover if it is no longer held."""
        obj, dest, relation = self._parts(s)
        name = self._names(s)[0]
        # held: the fingers did not close on nothing and the object keeps its distance to the hand (it may pivot)
        distance = float(np.linalg.norm(obj.pos - s.eef_pos))
        held = s.gripper_opening > 0.002 and abs(distance - self._grip_distance) < 0.03
        if not held:
            self._enter("recover")
            return s.eef_pos, OPEN
        hang = float(s.eef_pos[2] - obj.lo[2])  # the hand above the object's lowest point
        place_xy = dest.pos[:2]
        goal_xy = s.eef_pos[:2] + (place_xy - obj.pos[:2])
        support = self._support_top(s, dest, relation)
        goal = np.array([*goal_xy, support + self.config.place_gap + hang])
        travel = self._corridor_top(s, obj.pos[:2], place_xy, skip={name}) + self.config.clearance + hang
        travel = max(travel, goal[2] + 0.03)
        target = self._route(s, goal, travel, may_descend=True, tol_xy=0.006)
        # a stall above the target (the arm at its reach) releases from there: a short drop still lands it
        stuck_above = self._stalled() and self._near_xy(s, goal, 0.01) and s.eef_pos[2] < goal[2] + 0.06
        if self._arrived(s, goal, tol_xy=0.006) or stuck_above:
            self._enter("release")
        return target, CLOSE

    def _release(self, s: PrivilegedState):
        """Open in place."""
        if self._hold is None:
            self._hold = s.eef_pos.copy()
        if self.phase_steps >= self.config.open_steps:
            self._hold = s.eef_pos + np.array([0.0, 0.0, self.config.retreat])
            self._enter("retreat")
        return self._hold, OPEN

    def _retreat(self, s: PrivilegedState):
        """Rise, gripper open."""
        if s.eef_pos[2] > self._hold[2] - self.config.z_tol or self._stalled():
            self._enter("idle")
        return self._hold, OPEN

    def _recover(self, s: PrivilegedState):
        """A lost or missed grasp: open, rise a little, then approach with a fresh grasp."""
        if self._hold is None:
            self._hold = s.eef_pos + np.array([0.0, 0.0, 0.06])
        if self.phase_steps >= self.config.open_steps and s.gripper_opening > 0.06:
            self._grasp = None
            self._enter("approach")
        return self._hold, OPEN

    def _idle(self, s: PrivilegedState):
        """Wait (the env ends the episode on success); start over if the object is not in place."""
        obj, dest, relation = self._parts(s)
        if not self._placed(obj, dest, relation):  # the release did not achieve the goal: pick it up again
            self._grasp = None
            self.recoveries += 1
            self._enter("approach")
        return self._hold, OPEN

    # -- geometry -----------------------------------------------------------------------------------------
    def _names(self, s: PrivilegedState) -> tuple[str, str, str]:
        relation, obj, dest = s.goal[0]
        return obj, dest, relation

    def _parts(self, s: PrivilegedState) -> tuple[Pose, Pose, str]:
        obj, dest, relation = self._names(s)
        return s.objects[obj], s.pose(dest), relation

    def _support_top(self, s: PrivilegedState, dest: Pose, relation: str) -> float:
        """Height the object's bottom rests on at the target: the other object's top, or the container's floor."""
        if dest.lo is not None:
            return float(dest.hi[2])
        parent = s.pose(dest.parent) if dest.parent else None
        if relation == "in" and parent is not None and parent.lo is not None:
            return float(parent.lo[2]) + 0.01
        return float(dest.pos[2] - (dest.size[2] if dest.size is not None else 0.0))

    def _placed(self, obj: Pose, dest: Pose, relation: str) -> bool:
        if relation == "on":
            return bool(np.linalg.norm(obj.pos[:2] - dest.pos[:2]) < 0.03 and obj.lo[2] > dest.hi[2] - 0.02)
        half = dest.size if dest.size is not None else np.full(3, 0.05)
        return bool(np.all(np.abs(obj.pos[:2] - dest.pos[:2]) < half[:2]))

    def _obstacles(self, s: PrivilegedState, skip: set[str]) -> list[tuple[str, Pose]]:
        bodies = list(s.objects.items()) + list(s.fixtures.items())
        return [(n, p) for n, p in bodies if n not in skip and p.lo is not None]

    def _corridor_top(self, s: PrivilegedState, a: np.ndarray, b: np.ndarray, skip: set[str], radius: float = 0.06) -> float:
        """Highest obstacle top within `radius` of the straight xy path a -> b (the floor / table if none)."""
        points = a[None, :] + np.linspace(0.0, 1.0, 24)[:, None] * (b - a)[None, :]
        top = min(p.lo[2] for _, p in self._obstacles(s, set())) if s.objects else 0.0
        for _, p in self._obstacles(s, skip):
            inside = np.all((points >= p.lo[:2] - radius) & (points <= p.hi[:2] + radius), axis=1)
            if inside.any():
                top = max(top, float(p.hi[2]))
        return top

    def _choose_grasp(self, s: PrivilegedState) -> _Grasp:
        """The grasp whose open hand and fingers clear every other body, then the least turn, the least shift off
        the object's middle, the hand nearest the robot."""
        obj_name, dest_name, _ = self._names(s)
        obj = s.objects[obj_name]
        rot = _quat2mat(obj.quat)
        up = int(np.argmax(np.abs(rot[2])))  # the body axis closest to the world vertical
        sign = 1.0 if rot[2, up] > 0 else -1.0
        sides = [i for i in range(3) if i != up]
        half = (obj.local_hi - obj.local_lo) / 2
        top = (obj.local_lo + obj.local_hi) / 2
        top[up] = obj.local_hi[up] if sign > 0 else obj.local_lo[up]
        down = np.zeros(3)
        down[up] = -sign
        skip = {obj_name}
        candidates = []  # (local grip point, yaw, shift off the middle)
        if min(half[sides]) * 2 <= FINGER_SPAN:  # across the object, at its middle or a little below its top
            height = 2 * half[up]
            middle = top + down * max(min(height / 2, 0.045, height - 0.012), 0.0)
            width = obj.hi - obj.lo
            for yaw in (0.0, math.pi / 2):
                closing = np.array([-math.sin(yaw), math.cos(yaw), 0.0])
                across = np.array([math.cos(yaw), math.sin(yaw), 0.0])
                if abs(closing[:2]) @ width[:2] > FINGER_SPAN:
                    continue
                room = max(0.0, abs(across[:2]) @ width[:2] / 2 - 0.015)
                for shift in (0.0, 0.01, -0.01, 0.02, -0.02):
                    if abs(shift) <= room:
                        candidates.append((middle + rot.T @ (shift * across), yaw, abs(shift)))
            if not candidates:  # wider than the fingers both ways (e.g. knocked over): try across the narrower side
                candidates.append((middle, 0.0 if width[1] <= width[0] else math.pi / 2, 0.0))
        else:  # a rim: the fingers straddle the wall at angle theta around the object's axis
            container = self._container(s, obj)
            radius = float(min(half[sides]) - self.config.rim_inset)
            if container is not None:  # along the fixture's long interior axis (its local x), deeper inside
                radius = float(min(half[sides]) - self.config.container_inset)
                skip.add(container[0])
                thetas = [_yaw_of(container[1].quat) + k * math.pi for k in (0, 1)]
            else:
                thetas = [math.radians(a) for a in (90, 270, *range(0, 360, 30))]
            for theta in thetas:
                radial = rot.T @ np.array([math.cos(theta), math.sin(theta), 0.0])
                radial[up] = 0.0
                local = top + radius * radial / np.linalg.norm(radial) + down * self.config.rim_depth
                candidates.append((local, _wrap_half(theta - math.pi / 2), 0.0))
        place_xy = s.pose(dest_name).pos[:2]
        best = None
        for local, yaw, shift in candidates:
            grip = obj.pos + rot @ local
            hits = self._hits(s, grip, yaw, skip)
            reach = max(float(np.linalg.norm(grip[:2] - s.base_pos[:2])),
                        float(np.linalg.norm(place_xy + grip[:2] - obj.pos[:2] - s.base_pos[:2])))
            score = (-hits, -round(abs(yaw), 3), -shift, -reach)
            if best is None or score > best[0]:
                best = (score, _Grasp(local=local, yaw=yaw))
        return best[1]

    def _container(self, s: PrivilegedState, obj: Pose) -> tuple[str, Pose] | None:
        """A fixture the object sits inside (its top below the fixture's top), e.g. an open drawer."""
        center = (obj.lo + obj.hi)[:2] / 2
        for n, p in s.fixtures.items():
            if p.lo is not None and np.all(center > p.lo[:2]) and np.all(center < p.hi[:2]) and obj.hi[2] < p.hi[2]:
                return n, p
        return None

    def _hits(self, s: PrivilegedState, grip: np.ndarray, yaw: float, skip: set[str], margin: float = 0.01) -> int:
        """How many sample points of the open hand and fingers at this grasp fall inside another body's box."""
        closing = np.array([-math.sin(yaw), math.cos(yaw)])
        across = np.array([math.cos(yaw), math.sin(yaw)])
        a_lo, a_hi, c_lo, c_hi = FINGER
        parts = [(HAND, grip[2] + HAND_ABOVE), (FINGER, grip[2] - FINGER_BELOW),
                 (np.array([a_lo, a_hi, -c_hi, -c_lo]), grip[2] - FINGER_BELOW)]
        hits = 0
        for (a_lo, a_hi, c_lo, c_hi), bottom in parts:
            grid = np.stack(np.meshgrid(np.linspace(a_lo, a_hi, 4), np.linspace(c_lo, c_hi, 8)), -1).reshape(-1, 2)
            points = grip[:2] + grid[:, :1] * across + grid[:, 1:] * closing
            for _, p in self._obstacles(s, skip):
                if p.hi[2] > bottom - margin:
                    hits += int(np.all((points > p.lo[:2] - margin) & (points < p.hi[:2] + margin), axis=1).sum())
        return hits

    # -- motion -------------------------------------------------------------------------------------------
    def _route(self, s: PrivilegedState, goal: np.ndarray, travel_z: float, may_descend: bool, tol_xy: float | None = None):
        """Rise to travel_z, cross at that height, then descend onto goal (xy keeps being corrected)."""
        eef = s.eef_pos
        error_xy = float(np.linalg.norm(goal[:2] - eef[:2]))
        # descend once above the goal and no longer sliding sideways; small drifts on the way down (noise, a
        # pushed object) are corrected without climbing back
        settled = len(self._trail) < 4 or float(np.linalg.norm(self._trail[-1][:2] - self._trail[-4][:2])) < 0.012
        self._over = error_xy < 0.015 if self._over else (error_xy < (tol_xy or self.config.xy_tol) and settled)
        if self._over and may_descend:
            return goal
        if eef[2] < travel_z - 0.02 and not self._over:
            return np.array([eef[0], eef[1], travel_z])
        return np.array([goal[0], goal[1], travel_z])

    def _arrived(self, s: PrivilegedState, goal: np.ndarray, tol_xy: float | None = None) -> bool:
        err = goal - s.eef_pos
        return bool(np.linalg.norm(err[:2]) < (tol_xy or self.config.xy_tol) and abs(err[2]) < self.config.z_tol)

    def _near_xy(self, s: PrivilegedState, goal: np.ndarray, tol: float) -> bool:
        return bool(np.linalg.norm(goal[:2] - s.eef_pos[:2]) < tol)

    def _stalled(self) -> bool:
        return len(self._trail) >= 5 and float(np.linalg.norm(self._trail[-1] - self._trail[-5])) < 0.003

    def _yaw(self, s: PrivilegedState) -> float:
        """The hand's turn about the vertical since the episode's start."""
        r = _quat2mat(s.eef_quat) @ self._rot0.T
        return math.atan2(r[1, 0], r[0, 0])

    def _action(self, s: PrivilegedState, target: np.ndarray, gripper: float) -> np.ndarray:
        c = self.config
        move = c.pos_gain * (np.asarray(target) - s.eef_pos) / POS_UNIT
        peak = np.abs(move).max()
        if peak > 1.0:
            move /= peak  # keep the direction, saturate the speed
        if c.hold_orientation:  # the start orientation turned by the grasp's yaw
            error = _mat2axisangle(_rotz(self._turn) @ self._rot0 @ _quat2mat(s.eef_quat).T)
        else:  # only the turn about the vertical; roll and pitch are left to the arm
            error = np.array([0.0, 0.0, _wrap(self._turn - self._yaw(s))])
        rot = np.clip(c.rot_gain * error / ROT_UNIT, -1.0, 1.0)
        return np.concatenate([move, rot, [gripper]]).astype(np.float32)


# -- small rotation helpers (quaternions are x, y, z, w) -----------------------------------------------------
def _quat2mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = (float(v) for v in q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _mat2axisangle(r: np.ndarray) -> np.ndarray:
    angle = math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2)))
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * math.sin(angle))
    return axis * angle


def _rotz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _yaw_of(q: np.ndarray) -> float:
    r = _quat2mat(q)
    return math.atan2(r[1, 0], r[0, 0])


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def _wrap_half(a: float) -> float:
    """An angle modulo pi into (-pi/2, pi/2]: the two fingers are interchangeable."""
    a = _wrap(a)
    if a > math.pi / 2:
        a -= math.pi
    elif a <= -math.pi / 2:
        a += math.pi
    return a
